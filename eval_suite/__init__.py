"""eval_suite: the Instruction Modelling paper's 21 benchmarks in one command, without Axolotl.

- ``eval_suite.nlp``: the 18 NLP tasks as lm-eval task/group YAML, aggregated as in Table 1;
- ``eval_suite.humaneval``: HumanEval pass@k with sandboxed execution (opt-in);
- ``eval_suite.alpacaeval``: AlpacaEval 1.0 / 2.0 through alpaca_eval's own annotators;
- ``eval_suite.mtbench``: MT-Bench single-answer grading with FastChat's prompts;
- ``eval_suite.judge``: the one OpenAI-compatible judge client (and a local test/demo server);
- ``eval_suite.results`` / ``eval_suite.report``: one results schema and the IT-vs-IM report.

Run ``python -m eval_suite --help``; docs/eval_suite.md has the details.
"""
