"""Command line of the data preparation (``python -m instruction_modelling.data --help``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from instruction_modelling.core.read import read_local
from instruction_modelling.core.stats import dataset_stats

from . import DATASETS, DEFAULT_PREPARED_DIR, DEFAULT_RAW_DIR, MAIN_DATASETS, InputError, prepare

GROUPS = {"main": MAIN_DATASETS, "all": tuple(DATASETS)}


def _list(args) -> int:
    for spec in DATASETS.values():
        t5 = spec.table5
        size = f"{t5.n:>7,}" if t5 else "      -"
        origin = spec.raw or f"(from {spec.params.get('parent')})"
        print(f"{spec.name:<26} {size}  {spec.title:<34} raw: {origin}  online: {spec.online or '-'}")
    return 0


def _prepare(args) -> int:
    names: list[str] = []
    for name in args.names:
        names.extend(GROUPS.get(name, (name,)))
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        print(f"unknown dataset(s): {', '.join(unknown)}; see `python -m instruction_modelling.data list`",
              file=sys.stderr)
        return 2
    if args.source and len(names) != 1:
        print("--source names the raw file of ONE dataset; give one dataset name", file=sys.stderr)
        return 2
    cache: dict = {}
    for name in names:
        try:
            path, converted = prepare(name, args.out_dir, args.raw_dir, args.source, args.on_bad_rows, cache)
        except InputError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: {len(converted.rows)} rows -> {path}  ({len(converted.skipped)} skipped)")
        for note in converted.notes:
            print(f"  note: {note}")
        for message in converted.skipped[:5]:
            print(f"  skipped {message}")
        if len(converted.skipped) > 5:
            print(f"  ... and {len(converted.skipped) - 5} more skipped rows")
    return 0


def _stats(args) -> int:
    failed = False
    results = []
    for file in args.files:
        name = args.compare or Path(file).stem
        try:
            stats = dataset_stats(read_local(file).rows, source=Path(file).name)
        except (InputError, ValueError) as exc:
            print(str(exc), file=sys.stderr)
            return 1
        paper = DATASETS[name].table5 if name in DATASETS else None
        results.append({"file": str(file), "dataset": name, **stats,
                        "paper_table5": paper.__dict__ if paper else None})
        if args.json:
            continue
        print(f"{file}: {stats['n']:,} rows")
        print(f"  words (len(text.split()))        instruction {stats['mean_instruction_words']:8.2f}  "
              f"output {stats['mean_output_words']:8.2f}  ratio {stats['ratio']:.4f}")
        print(f"  Table 5 convention (+1/message)  instruction {stats['table5_mean_instruction_words']:8.2f}  "
              f"output {stats['table5_mean_output_words']:8.2f}  ratio {stats['table5_ratio']:.4f}")
        if paper:
            print(f"  paper Table 5 {'(' + name + ')':<18} instruction {paper.instruction_words:8.2f}  "
                  f"output {paper.output_words:8.2f}  ratio {paper.ratio:.4f}  n {paper.n:,}")
    if args.json:
        print(json.dumps(results, indent=2))
    if args.check:
        for r in results:
            paper = r["paper_table5"]
            if paper is None:
                print(f"--check: {r['file']}: no Table 5 row for '{r['dataset']}' (use --compare NAME)",
                      file=sys.stderr)
                failed = True
                continue
            diffs = [
                ("n", r["n"], paper["n"], 0),
                ("instruction words", round(r["table5_mean_instruction_words"], 2), paper["instruction_words"], 0.005),
                ("output words", round(r["table5_mean_output_words"], 2), paper["output_words"], 0.005),
            ]
            for what, ours, theirs, tol in diffs:
                if abs(ours - theirs) > tol:
                    print(f"--check: {r['file']}: {what} {ours} differs from Table 5's {theirs}", file=sys.stderr)
                    failed = True
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m instruction_modelling.data",
        description="Prepare the paper's datasets as messages JSONL (the recipes read data/prepared/<name>.jsonl) "
                    "and report their Table 5 statistics.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="every dataset, its size in the paper, raw file and online source")
    p.set_defaults(func=_list)

    p = sub.add_parser("prepare", help="build data/prepared/<name>.jsonl from a local raw file (or online)")
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="dataset name(s) from `list`, or 'main' (the 7 Table 1 datasets) or 'all'")
    p.add_argument("--source", help="raw file of the one dataset named (JSON, JSONL, or the LESS .zip); "
                                    "the paper's released messages .jsonl files are accepted too")
    p.add_argument("--raw-dir", default=DEFAULT_RAW_DIR,
                   help="where raw files live when --source is not given (default: %(default)s; layout in `list`)")
    p.add_argument("--out-dir", default=DEFAULT_PREPARED_DIR, help="output directory (default: %(default)s)")
    p.add_argument("--on-bad-rows", choices=("error", "skip"), default="error",
                   help="error: stop at the first unusable row, naming file, row and field (default). "
                        "skip: drop such rows, count them and print the first few")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("stats", help="example count and mean instruction/output words (Table 5)")
    p.add_argument("files", nargs="+", help="messages JSONL files (or Alpaca / prompt-completion rows)")
    p.add_argument("--compare", metavar="NAME", help="dataset whose Table 5 row to compare with "
                                                     "(default: the file name's stem)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless the count equals Table 5 and the mean words under the paper's "
                        "convention (+1 per message) round to Table 5's two decimals")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=_stats)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    from instruction_modelling.commands.cli import run_module_main  # third-party noise filtered; --verbose keeps it

    raise SystemExit(run_module_main(main))
