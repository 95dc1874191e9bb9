"""``eval-suite all MODEL --run-dir DIR``: every benchmark for one model, resumable, then the report.

Order: preflight (all checks, before anything loads), then HumanEval, AlpacaEval 1.0 and 2.0 and
MT-Bench on one loaded model (generation resumable per sample), judging (cached), the NLP suite
(lm-eval with its request cache, so it resumes too), and the report. A benchmark whose results file
was made from the same inputs (:mod:`eval_suite.freshness`: weights hash, protocol, settings) is not
run again; one made from other inputs is refused in preflight unless ``--rerun``.

The stage functions are also what the single-benchmark commands call, so every results file carries
the same provenance.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval_suite import provenance as prov
from eval_suite.freshness import GENERATION_FILE  # per benchmark folder: SampleStore rows, appended as they come
from eval_suite.preflight import PreflightError
from eval_suite.results import BENCHMARKS, BenchmarkResult, load_result

log = logging.getLogger(__name__)

JUDGED = ("alpaca_eval_1", "alpaca_eval_2", "mt_bench")
# The authors' generation lengths (paper.md §4.1): AlpacaEval 8,192 (open-instruct), HumanEval 512,
# MT-Bench 1,024 (FastChat's default).
ALPACA_EVAL_MAX_NEW_TOKENS = 8192
ALPACA_EVAL_OUTPUTS = "alpaca_eval"  # RUN_DIR/alpaca_eval/generations.jsonl: the outputs both versions judge


@dataclass
class Run:
    """One model's run: the parsed options plus what is loaded lazily and shared between stages."""

    args: Any
    run_dir: Path
    judge_reported: str | None = None
    _generator: Any = None
    _client: Any = None
    _weights: dict[str, Any] | None = None
    benchmarks: list[str] | None = None  # what `eval-suite all` runs (None: one benchmark's command)
    _backend: str | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    stores: dict[str, Any] = field(default_factory=dict)  # benchmark -> its SampleStore, once opened

    def weights(self) -> dict[str, Any]:
        """The model folder's content hash (:func:`eval_suite.fingerprint.weights_fingerprint`), computed once."""
        if self._weights is None:
            from eval_suite.fingerprint import weights_fingerprint

            self._weights = weights_fingerprint(self.model_dir)
        return self._weights

    def generation_inputs(self, benchmark: str) -> dict[str, Any]:
        from eval_suite import freshness

        return freshness.generation_inputs(self.args, benchmark, self.weights()["sha256"])

    def result_inputs(self, benchmark: str) -> dict[str, Any]:
        from eval_suite import freshness

        humaneval_key = None
        if benchmark == "nlp":  # its Math & Coding category folds in the HumanEval result
            if self.benchmarks is None:
                humaneval_key = freshness.stored_result_key(self.run_dir, "humaneval")[0]
            elif "humaneval" in self.benchmarks:
                humaneval_key = freshness.digest(self.result_inputs("humaneval"))
        return freshness.result_inputs(self.args, benchmark, self.weights()["sha256"], self.judge_reported, humaneval_key)

    def batch_settings(self) -> dict[str, Any]:
        """The batch settings (they decide the sampling seeds), backend and dtype as loaded."""
        gen, a = self._generator, self.args
        model = getattr(gen, "_model", None)
        return {"batch_size": getattr(a, "batch_size", None),
                "batch_tokens": getattr(gen, "batch_tokens", None) or getattr(a, "batch_tokens", None),
                "backend": getattr(gen, "backend", None), "device": getattr(gen, "device", None),
                "dtype": str(model.dtype) if model is not None else getattr(getattr(gen, "options", None), "dtype", None)}

    def begin(self, benchmark: str) -> None:
        """Before a stage: the judge models recorded are the ones that answer this benchmark."""
        if self._client is not None:
            self._client.reported_models.clear()

    def stamp(self, benchmark: str, result: BenchmarkResult) -> BenchmarkResult:
        """Add what makes a result's provenance its own: the weights hash, the inputs key, command, version."""
        from eval_suite import freshness

        inputs = self.result_inputs(benchmark)
        a = self.args
        store = self.stores.get(benchmark)
        batch = ({"batch_size": getattr(a, "nlp_batch_size", None) or getattr(a, "batch_size", None)}
                 if benchmark == "nlp" else self.batch_settings())
        result.provenance.update(
            model=self.weights(), key=freshness.digest(inputs), inputs=inputs,
            protocol=self.protocol.name, deviations=deviations(a, self.protocol, benchmark),
            protocol_preset=freshness.protocol_settings(a)["preset"], protocol_settings=freshness.protocol_settings(a),
            dtype={"requested": getattr(a, "dtype", None), "loaded": batch.get("dtype")}, batch=batch,
            generation_sessions=store.sessions if store is not None else None,
            command=prov.command_line(["eval-suite", *a.argv]) if hasattr(a, "argv") else prov.command_line(),
            project=prov.project())
        if benchmark in JUDGED:
            judge = self.judge_info()
            result.provenance.update(judge=judge, judge_model=judge["model"])
            result.config["judge_model_reported"] = judge["model"]
            if judge["model"] and ", " in judge["model"]:
                result.notes.append(f"the judge's answers came from several models ({judge['model']}): not one judge")
        return result

    @property
    def backend(self) -> str:
        """``--backend`` with ``auto`` resolved once: generation and the NLP suite run on the same one."""
        if self._backend is None:
            from eval_suite.generation import resolve_backend

            self._backend = resolve_backend(self.args.backend)
        return self._backend

    @property
    def model_dir(self) -> str:
        return str(self.args.model)

    @property
    def protocol(self):
        """The :class:`eval_suite.protocol.Protocol` the run follows (``--protocol``)."""
        from eval_suite import protocol as protocols

        return getattr(self.args, "protocol_spec", None) or protocols.get(getattr(self.args, "protocol", None))

    def context_length(self) -> int | None:
        """The context length generation stops at, when the protocol caps it (else None)."""
        return self.generator().context_length() if self.protocol.cap_at_context_length else None

    def record(self, benchmark: str, **fields: Any) -> dict[str, Any]:
        """The provenance block of one stage; :meth:`stamp` adds the protocol, its deviations and the keys."""
        return prov.record(**fields)

    @property
    def model_name(self) -> str:
        return getattr(self.args, "model_name", None) or Path(self.model_dir.rstrip("/")).name

    def generator(self):
        if self._generator is None:
            from eval_suite.generation import BackendOptions, Generator, load_chat_template

            a = self.args
            options = BackendOptions(dtype=a.dtype, device=a.device, tensor_parallel_size=a.tensor_parallel_size,
                                     gpu_memory_utilization=a.gpu_memory_utilization, max_model_len=a.max_model_len)
            self._generator = Generator(self.model_dir, load_chat_template(a.chat_template), a.batch_size, self.backend,
                                        batch_tokens=a.batch_tokens, options=options)
        return self._generator

    def release_generator(self) -> None:
        """Free the generation model before lm-eval loads its own copy."""
        if self._generator is not None:
            self._generator = None
            gc.collect()
            try:
                import torch

                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - CPU-only torch
                pass

    def client(self):
        if self._client is None:
            from eval_suite.judge import client_from_args

            self._client = client_from_args(self.args)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def template(self) -> dict[str, Any]:
        gen = self.generator()
        name = self.args.chat_template or "tokenizer"
        return {"name": name, "sha256": gen.template_hash(), "bos_id": gen.bos_id}

    def judge_info(self) -> dict[str, Any]:
        from eval_suite.preflight import judge_host

        answered = self._client.reported_model() if self._client is not None else None
        # The model named in the answers (live and cached) of this benchmark; the preflight probe's name otherwise.
        return {"model": answered or self.judge_reported, "probed": self.judge_reported,
                "requested": self.args.judge_model, "host": judge_host(self.args.judge_base_url)}

    def count(self, benchmark: str, before: tuple[int, int]) -> None:
        gen = self._generator
        generated, reused = gen.generated - before[0], gen.reused - before[1]
        self.counts[benchmark] = {"generated": generated, "reused": reused}
        print(f"{benchmark}: generated {generated} samples, {reused} already in {self.run_dir}", flush=True)

    def mark(self) -> tuple[int, int]:
        gen = self.generator()
        return gen.generated, gen.reused


def deviations(args: Any, protocol, benchmark: str) -> list[str]:
    """Options that change ``benchmark``'s settings away from the protocol (smoke-run shortcuts, mostly)."""
    from eval_suite.humaneval.bench import PAPER_SAMPLES, PAPER_TEMPERATURES

    if benchmark == "nlp":  # lm-eval runs each task's own settings; --limit is recorded on its own
        return []
    out = []
    if getattr(args, "max_new_tokens", None):
        out.append(f"--max-new-tokens {args.max_new_tokens}")
    if benchmark == "humaneval":
        if getattr(args, "n", PAPER_SAMPLES) != PAPER_SAMPLES:
            out.append(f"--n {args.n}")
        if list(getattr(args, "temperatures", PAPER_TEMPERATURES)) != list(PAPER_TEMPERATURES):
            out.append("--temperatures " + " ".join(f"{t:g}" for t in args.temperatures))
    if getattr(args, "top_k", None) is not None:  # --protocol paper refuses --top-k; under default it is a change
        out.append(f"--top-k {args.top_k}")
    return out


def store_for(run: Run, folder: str, meta: dict[str, Any]):
    """The benchmark's SampleStore, keyed on its generation inputs plus the resolved ``meta`` (template, BOS)."""
    from eval_suite.records import SampleStore

    resolved = {k: v for k, v in meta.items() if k != "model"}  # the weights' hash stands for the model, not its path
    store = SampleStore(run.run_dir / folder / GENERATION_FILE, {"inputs": run.generation_inputs(folder), **resolved},
                        session=run.batch_settings())
    run.stores[folder] = store
    return store


# ---- stages ------------------------------------------------------------------------------------

def humaneval_generate(run: Run) -> tuple[Path, dict[str, Any], str]:
    """Sample HumanEval (resumable); returns the samples file, the sampling settings and the backend."""
    from eval_suite.humaneval import bench
    from eval_suite.records import write_jsonl

    a = run.args
    problems = bench.load_problems(a.problems)
    max_new = a.max_new_tokens or bench.PAPER_SAMPLING["max_new_tokens"]
    sampling = {"n": a.n, "temperatures": list(a.temperatures), "top_p": bench.PAPER_SAMPLING["top_p"], "top_k": a.top_k,
                "max_new_tokens": max_new, "stop": list(bench.PAPER_SAMPLING["stop"]), "seed": a.seed}
    gen = run.generator()
    sampling["context_length"] = run.context_length()
    store = store_for(run, "humaneval", {"model": run.model_dir, "template": None, "bos_id": gen.bos_id, **sampling})
    before = run.mark()
    samples = bench.sample(gen, problems, a.temperatures, a.n, a.limit, max_new_tokens=max_new, top_k=a.top_k, store=store,
                           context_length=sampling["context_length"])
    run.count("humaneval", before)
    return write_jsonl(run.run_dir / "humaneval" / "samples.jsonl", samples), sampling, gen.backend


def humaneval_stage(run: Run) -> BenchmarkResult:
    from eval_suite.humaneval import bench
    from eval_suite.humaneval.sandbox import SandboxLimits
    from eval_suite.records import write_jsonl

    a = run.args
    started = prov.now()
    samples_path, sampling, backend = humaneval_generate(run)
    problems = bench.load_problems(a.problems)
    result, executed = bench.score(bench.read_samples(samples_path, problems, a.temperatures), problems, allow_code_execution=True,
                                   model=run.model_name, workers=a.workers, ks=a.k,
                                   limits=SandboxLimits(wall_seconds=a.timeout, cpu_seconds=max(1, int(a.timeout))))
    write_jsonl(Path(str(samples_path) + "_results.jsonl"), executed)
    result.provenance = run.record("humaneval", model=_fingerprint(run), backend=backend, template=None,
                                   sampling=sampling, limit=a.limit, started=started, prompt_format="raw")
    return result


def alpaca_eval_stage(run: Run, version: str) -> BenchmarkResult:
    from eval_suite.alpacaeval import bench
    from eval_suite.generation import SamplingConfig

    a = run.args
    started = prov.now()
    reference_file = getattr(a, f"{version}_reference")
    references = bench.read_outputs(reference_file)
    bench.check_reference(version, references, str(reference_file))
    out_dir = run.run_dir / version
    sampling = SamplingConfig(max_new_tokens=a.max_new_tokens or ALPACA_EVAL_MAX_NEW_TOKENS, temperature=0.0, top_k=a.top_k,
                              seed=a.seed, context_length=run.context_length())
    gen = run.generator()
    template = run.template()
    # One store for both versions: the outputs are generated once and judged by both annotators (the
    # authors' script reuses its outputs file too). Rows are keyed by the instruction's text, so the
    # two reference files need not list the instructions in the same order.
    store = run.stores[version] = store_for(run, ALPACA_EVAL_OUTPUTS, {"model": run.model_dir, "template": template,
                                                                       **sampling.protocol()})
    before = run.mark()
    outputs = bench.generate(gen, reference_file, run.model_name, sampling, a.limit, store=store)
    run.count(version, before)
    out_dir.mkdir(parents=True, exist_ok=True)
    import json

    (out_dir / "model_outputs.json").write_text(json.dumps(outputs, indent=2, ensure_ascii=False))
    result = bench.judge(version, outputs, references, run.client(), out_dir, a.judge_model, a.lc_data)
    result.config.update(judge_model_reported=run.judge_reported, judge_base_url=run.judge_info()["host"])
    result.provenance = run.record(version, model=_fingerprint(run), backend=gen.backend, template=template,
                                   sampling=sampling.protocol(), limit=a.limit, started=started, judge=run.judge_info(),
                                   reference_sha256=prov.file_sha256(reference_file), prompt_format="chat-template",
                                   outputs=str(Path(ALPACA_EVAL_OUTPUTS) / GENERATION_FILE))
    return result


def mt_bench_stage(run: Run) -> BenchmarkResult:
    from eval_suite.mtbench import bench
    from eval_suite.records import write_jsonl

    a = run.args
    started = prov.now()
    questions = bench.load_questions(a.questions, a.limit)
    gen = run.generator()
    fmt = a.mt_bench_format
    fastchat_name = getattr(a, "fastchat_template", None)
    top_k = getattr(a, "mt_bench_top_k", a.top_k)
    if fmt == "fastchat":
        conv = bench.fastchat_template(a.fastchat_model_path or run.model_dir, fastchat_name)
        template = {"name": f"fastchat:{conv.name}", "sha256": prov.text_sha256(repr(conv)), "bos_id": gen.bos_id}
    else:
        template = run.template()
    max_new = a.max_new_tokens or bench.CONFIG["max_new_tokens"]
    sampling = {"temperatures": bench.CONFIG["temperature_config"], "top_k": top_k, "max_new_tokens": max_new,
                "seed": a.seed}
    store = store_for(run, "mt_bench", {"model": run.model_dir, "template": template, **sampling})
    before = run.mark()
    rows = bench.generate(gen, questions, run.model_name, max_new, fmt, a.fastchat_model_path, top_k, store=store,
                          fastchat_template_name=fastchat_name)
    run.count("mt_bench", before)
    out_dir = run.run_dir / "mt_bench"
    write_jsonl(out_dir / "model_answer.jsonl", rows)
    answers = {r["question_id"]: r["choices"][0]["turns"] for r in rows}
    result = bench.judge(questions, answers, run.client(), out_dir, run.model_name, a.judge_model)
    result.config.update(judge_model_reported=run.judge_reported, judge_base_url=run.judge_info()["host"])
    result.provenance = run.record("mt_bench", model=_fingerprint(run), backend=gen.backend, template=template,
                                   sampling=sampling, limit=a.limit, started=started, judge=run.judge_info(), prompt_format=fmt)
    return result


def nlp_stage(run: Run, humaneval: BenchmarkResult | None) -> BenchmarkResult:
    from eval_suite.nlp import bench

    a = run.args
    started = prov.now()
    run.release_generator()
    backend = run.backend  # the generation stages' backend, auto included
    result = bench.run(run.model_dir, run.run_dir, tasks=a.tasks, include_paths=[bench.TASKS_DIR, *a.include_path],
                       include_defaults=not a.no_builtin_tasks, dataset_overrides=a.dataset_overrides,
                       limit=a.limit, batch_size=a.nlp_batch_size, device=_lm_eval_device(a.device),
                       model_name=run.model_name, humaneval=humaneval, backend=backend,
                       backend_options=_vllm_model_args(a) if backend == "vllm" else {},
                       log_samples=a.log_samples, use_cache=_lm_eval_cache(run), protocol=run.protocol)
    result.provenance = run.record("nlp", model=_fingerprint(run), backend=backend, template=None,
                                   sampling={"decoding": "each task's lm-eval settings",
                                             "add_bos_token": run.protocol.lm_eval_add_bos_token},
                                   limit=a.limit, started=started, n_shot=result.config.get("n_shot"),
                                   tasks=result.config.get("tasks"), prompt_format="lm-eval task prompts")
    return result


def _lm_eval_device(device: str) -> str:
    from eval_suite.generation import resolve_device

    return resolve_device(device)


def _vllm_model_args(a) -> dict[str, Any]:
    args = {"dtype": a.dtype, "tensor_parallel_size": a.tensor_parallel_size, "gpu_memory_utilization": a.gpu_memory_utilization}
    if a.max_model_len:
        args["max_model_len"] = a.max_model_len
    return args


def _fingerprint(run: Run) -> dict[str, Any]:
    return run.weights()


def _lm_eval_cache(run: Run) -> str:
    from eval_suite.freshness import lm_eval_cache

    return str(lm_eval_cache(run.run_dir, run.generation_inputs("nlp")))


# ---- the whole run -----------------------------------------------------------------------------

def preflight(run: Run, benchmarks: list[str]) -> list[str]:
    """Run every check that applies; returns the failure lines (empty when all pass)."""
    from eval_suite import preflight as pf

    a = run.args
    failures: list[str] = []

    def attempt(check, *args):
        try:
            return check(*args)
        except PreflightError as e:
            failures.append(str(e))
            return None

    if "humaneval" in benchmarks:
        attempt(pf.check_code_execution, a.allow_code_execution)
    run._backend = attempt(pf.check_backend, a.backend)
    for version in ("alpaca_eval_1", "alpaca_eval_2"):
        if version in benchmarks:
            flag = f"--{version.replace('_', '-')}-reference"
            path = attempt(pf.check_file, getattr(a, f"{version}_reference"), version, flag, version)
            if path is not None:
                attempt(_check_reference, version, path)
    if not Path(run.model_dir).is_dir():
        failures.append(f"model {run.model_dir}: no such directory; pass a local Hugging Face model folder")
    device = attempt(pf.check_device, a.device)
    if device and device.startswith("cuda") and Path(run.model_dir).is_dir() and set(benchmarks) - {"nlp"}:
        # One sample of the longest generation (AlpacaEval's 8,192 new tokens) after a long prompt.
        longest = (a.max_new_tokens or ALPACA_EVAL_MAX_NEW_TOKENS) + 2048
        attempt(pf.gpu_memory_check, run.model_dir, device, longest)
    if set(benchmarks) & set(JUDGED):
        try:
            from eval_suite.judge import client_from_args

            client = run._client = client_from_args(a)
            run.judge_reported = attempt(pf.probe_judge, client, a.judge_model or "gpt-4")
        except ValueError as e:  # no API key for OpenAI
            failures.append(str(e))
    if Path(run.model_dir).is_dir() and not getattr(a, "rerun", False):
        from eval_suite.freshness import refusal

        for benchmark in benchmarks:  # stored artefacts made from other inputs: never reused
            if benchmark in JUDGED and run.judge_reported is None:
                continue  # the judge line above says why; its answering model is part of the inputs
            line = refusal(run.run_dir, benchmark, run.generation_inputs(benchmark), run.result_inputs(benchmark))
            if line:
                failures.append(line)
    if "nlp" in benchmarks:
        from eval_suite.nlp import bench

        overrides = bench.load_overrides(bench.DEFAULT_OVERRIDES if not a.no_builtin_tasks else None, a.dataset_overrides)
        attempt(pf.check_nlp_datasets, [bench.TASKS_DIR, *a.include_path], a.tasks or [bench.Suite.load().lm_eval_group],
                overrides, not a.no_builtin_tasks, run.run_dir / "nlp" / "dataset_overrides.todo.yaml")
    return failures


def _check_reference(version: str, path: Path) -> None:
    from eval_suite.alpacaeval import bench

    try:
        bench.check_reference(version, bench.read_outputs(path), str(path))
    except ValueError as e:
        raise PreflightError(str(e)) from None


def already_done(run: Run, benchmark: str) -> BenchmarkResult | None:
    """The stored result when it was made from the current inputs (weights hash, protocol, settings), else None."""
    from eval_suite.freshness import digest

    path = run.run_dir / "results" / f"{benchmark}.json"
    if not path.is_file():
        return None
    result = load_result(path)
    return result if result.provenance.get("key") == digest(run.result_inputs(benchmark)) else None


def rerun(run: Run, benchmark: str) -> None:
    """``--rerun``: move the benchmark's results, samples and lm-eval cache aside, so nothing of them is reused."""
    from eval_suite.freshness import set_aside

    moved = set_aside(run.run_dir, benchmark)
    if moved is not None:
        print(f"{benchmark}: --rerun: its earlier results and samples are now in {moved}", flush=True)


def run_all(args) -> dict[str, BenchmarkResult]:
    """Preflight, every benchmark not skipped, then the report. Returns the results by benchmark."""
    import time

    benchmarks = [b for b in BENCHMARKS if b not in (args.skip or [])]
    run = Run(args, Path(args.run_dir), benchmarks=benchmarks)
    start = time.monotonic()
    failures = preflight(run, benchmarks)
    if failures:
        run.close()
        raise SystemExit("eval-suite all: preflight failed (nothing was generated):\n" + "\n".join(f"  - {f}" for f in failures))
    log.info("preflight passed in %.1f s; judge reports itself as %s", time.monotonic() - start, run.judge_reported)
    results: dict[str, BenchmarkResult] = {}
    stages = {"humaneval": humaneval_stage, "alpaca_eval_1": lambda r: alpaca_eval_stage(r, "alpaca_eval_1"),
              "alpaca_eval_2": lambda r: alpaca_eval_stage(r, "alpaca_eval_2"), "mt_bench": mt_bench_stage,
              "nlp": lambda r: nlp_stage(r, results.get("humaneval"))}
    try:
        order = [b for b in ("humaneval", "alpaca_eval_1", "alpaca_eval_2", "mt_bench", "nlp") if b in benchmarks]
        for benchmark in order if args.rerun else ():  # all first: AlpacaEval 2.0 reuses the outputs 1.0 makes
            rerun(run, benchmark)
        for benchmark in order:
            done = None if args.rerun else already_done(run, benchmark)
            if done is not None:
                print(f"{benchmark}: results already in {run.run_dir / 'results'}; skipped (--rerun to redo)", flush=True)
                results[benchmark] = done
                continue
            run.begin(benchmark)
            results[benchmark] = run.stamp(benchmark, stages[benchmark](run))
            print(f"{benchmark}: wrote {results[benchmark].write(run.run_dir)}", flush=True)
    finally:
        run.close()
    from eval_suite.report import write_report

    baselines = [Path(args.baseline_run)] if args.baseline_run else []
    for path in write_report([run.run_dir], run.run_dir / "report", baselines[0] if baselines else None,
                             allow_mixed=args.allow_mixed):
        print(f"wrote {path}")
    return results
