"""``dsa-prepare-data``: tokenize text / JSONL files into a Megatron-Core indexed dataset.

Examples::

    dsa-prepare-data --output data/stdlib --stdlib                     # the embedded default corpus
    dsa-prepare-data --output data/mydocs docs/ notes.txt              # files and directories, byte tokenizer
    dsa-prepare-data --output data/web --tokenizer tokenizer.json --json-key text shard_*.jsonl

Text files are one document each; ``.jsonl`` files hold one document per line (field ``--json-key``, which must
be a string). Bad input stops the run with one line naming the file and line; nothing is written then.
Directories are searched recursively for ``--ext`` files. The result is ``<output>.bin``, ``<output>.idx``
(Megatron-Core ``indexed_dataset`` format, one EOD token after each document) and ``<output>.json`` (tokenizer,
vocabulary size, EOD id, counts) -- train on it with ``data.corpus=<output>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsa_dist.train.data import BYTE_TOKENIZER, load_tokenizer, read_documents, stdlib_files, write_indexed_dataset


def _collect(inputs: list[str], exts: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in exts)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"input {item!r} is neither a file nor a directory")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsa-prepare-data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="text/.jsonl files or directories")
    parser.add_argument("--output", required=True, help="output path prefix (writes .bin/.idx/.json)")
    parser.add_argument("--tokenizer", default=BYTE_TOKENIZER,
                        help="'byte' (default) or a Hugging Face tokenizer.json file")
    parser.add_argument("--eod-token", default=None, help="end-of-document token of a HF tokenizer")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl files")
    parser.add_argument("--ext", nargs="+", default=[".txt", ".md", ".py", ".jsonl"],
                        help="file suffixes taken from directories")
    parser.add_argument("--stdlib", action="store_true", help="add this Python's standard library .py files")
    parser.add_argument("--max-files", type=int, default=0, help="with --stdlib: first N files only (0 = all)")
    args = parser.parse_args(argv)
    try:
        files = _collect(args.inputs, args.ext)
        if args.stdlib:
            files += stdlib_files(args.max_files)
        if not files:
            raise ValueError("no input files: pass files/directories or --stdlib")
        tokenizer = load_tokenizer(args.tokenizer, args.eod_token)
        meta = write_indexed_dataset(read_documents(files, args.json_key), args.output, tokenizer,
                                     sources=[str(f) for f in files[:1000]])
    except ValueError as err:
        print(f"dsa-prepare-data: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"dsa-prepare-data: cannot write {args.output}: {err.strerror or err} ({err.filename or ''})",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsa-prepare-data: interrupted (no dataset written)", file=sys.stderr)
        return 130
    print(f"wrote {args.output}.bin/.idx/.json: {meta['documents']} documents, {meta['tokens']:,} tokens, "
          f"tokenizer {meta['tokenizer']} (vocab {meta['vocab_size']}, eod {meta['eod_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
