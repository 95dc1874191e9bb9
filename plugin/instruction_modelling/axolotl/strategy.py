"""Axolotl dataset type ``instruction_modelling``: rows -> input_ids, labels, segment_ids.

A thin adapter: segmentation is ``segments.RowEncoder``. This module adds what only the
dataset pass can do: the file and row of a bad row, skipping and counting bad rows, and
truncation that keeps ``segment_ids`` aligned with ``input_ids``.
"""

from __future__ import annotations

import logging

from instruction_modelling.core.options import IMArgs
from instruction_modelling.core.segments import (
    AXOLOTL_TEMPLATE_ROLES,
    DEFAULT_ROLE_ALIASES,
    OUTPUT_SEGMENTS,
    TRAIN_ON_EOS,
    WEIGHT_KEY_SEGMENT,
    ChatRenderer,
    RowEncoder,
    RowError,
    RowFields,
    describe_row,
    detect_format,
    unconfigured_end_markers,
)

from . import raw_rows

LOG = logging.getLogger("axolotl.integrations.instruction_modelling")

ERROR_COLUMN = "_im_error"
STRADDLED_COLUMN = "_im_straddled"
SCHEMA_COLUMN = "_im_unweighted_schema_chars"


class BadRowsError(ValueError):
    """Rows that could not be segmented, with their file, row and field."""


# Axolotl dataset options (SFTDataset, 0.19) that type instruction_modelling does not support, with
# what to do instead. Every other option is honoured (see the README's table).
REFUSED_DATASET_OPTIONS = {
    "roles_to_train": "type instruction_modelling chooses trained roles from im_mode / im_role_weights; "
                      "remove roles_to_train",
    "split_thinking": "put the reasoning into each message's reasoning_content field (field_thinking) instead "
                      "of splitting it out of the content",
    "input_transform": "transform the rows before training (e.g. `python -m instruction_modelling.data`)",
    "conversation": "this is a fastchat-conversation option; use chat_template / chat_template_jinja",
    "input_format": "this option belongs to other dataset types; rows are read as messages, "
                    "instruction/input/output or prompt/completion",
    "no_input_format": "this option belongs to other dataset types; Alpaca rows use Axolotl's alpaca prompt",
    "field": "this option belongs to completion datasets; use prompt/completion rows",
    "field_human": "use message_property_mappings / roles to map ShareGPT-style rows",
    "field_model": "use message_property_mappings / roles to map ShareGPT-style rows",
    "logprobs_field": "knowledge-distillation logprobs are not used by instruction modelling",
    "temperature": "knowledge-distillation temperature is not used by instruction modelling",
}


def check_dataset_options(ds_cfg, trained_roles: list[str]) -> None:
    """Refuse, in one sentence each, the Axolotl dataset options this type cannot honour.

    Args:
        ds_cfg: one ``datasets:`` entry.
        trained_roles: ``IMArgs.trained_roles()``; the plugin writes them into ``roles_to_train``
            (for Axolotl's dataset hash), so only a different list is refused.
    """
    where = f"dataset {ds_cfg.get('path')}"
    for option, instead in REFUSED_DATASET_OPTIONS.items():
        value = ds_cfg.get(option)
        if option == "roles_to_train" and value is not None and list(value) == list(trained_roles):
            continue
        if value not in (None, False, "", [], {}):
            raise ValueError(f"{where}: type instruction_modelling does not support `{option}`: {instead}")
    eos, eot = ds_cfg.get("train_on_eos"), ds_cfg.get("train_on_eot")
    for option, value in (("train_on_eos", eos), ("train_on_eot", eot)):
        if value is not None and value not in TRAIN_ON_EOS:
            raise ValueError(f"{where}: {option} must be one of {', '.join(TRAIN_ON_EOS)}, got {value!r}")
    if eos is not None and eot is not None and eos != eot:
        raise ValueError(f"{where}: type instruction_modelling treats EOS and end-of-turn tokens alike; "
                         f"set train_on_eos and train_on_eot to the same value (got {eos!r} and {eot!r})")


def train_on_eos_of(ds_cfg) -> str:
    return ds_cfg.get("train_on_eos") or ds_cfg.get("train_on_eot") or "turn"


def row_fields_from_dataset_config(ds_cfg: dict) -> RowFields:
    """Map Axolotl's chat_template dataset options onto ``RowFields``."""
    mappings = dict(ds_cfg.get("message_property_mappings") or {})
    role = mappings.get("role") or ds_cfg.get("message_field_role") or "role"
    content = mappings.get("content") or ds_cfg.get("message_field_content") or "content"
    aliases = dict(DEFAULT_ROLE_ALIASES)
    template_roles = dict(AXOLOTL_TEMPLATE_ROLES)
    if ds_cfg.get("roles"):
        template_roles = {}  # as Axolotl: with `roles:`, only the listed names are renamed
        for canonical, names in ds_cfg["roles"].items():
            for name in names if isinstance(names, (list, tuple)) else [names]:
                aliases[name] = canonical
                template_roles[name] = canonical
    thinking_key = ds_cfg.get("template_thinking_key") or "reasoning_content"
    return RowFields(
        messages=ds_cfg.get("field_messages") or "messages",
        role=role,
        content=content,
        role_aliases=aliases,
        template_roles=template_roles,
        property_mappings={**mappings, "role": role, "content": content},
        tools=ds_cfg.get("field_tools") or "tools",
        thinking=ds_cfg.get("field_thinking") or "reasoning_content",
        template_thinking_key=thinking_key,
        training=ds_cfg.get("message_field_training") or None,
        training_detail=ds_cfg.get("message_field_training_detail") or None,
    )


def template_name_of(cfg, ds_cfg) -> str:
    """How errors name the chat template: the config's ``chat_template`` value (``falcon_h1``,
    ``tokenizer_default``), or ``chat_template_jinja`` for an inline template."""
    name = ds_cfg.get("chat_template") or cfg.get("chat_template") or "tokenizer_default"
    name = getattr(name, "value", name)  # Axolotl's ChatTemplate enum after validation
    return "chat_template_jinja" if name == "jinja" else str(name)


class InstructionModellingStrategy:
    """Dataset wrapping strategy (Axolotl's ``DatasetWrappingStrategy`` protocol; the plugin registers
    it as a virtual subclass, so importing this module does not import Axolotl)."""

    def __init__(self, encoder: RowEncoder, *, path: str | None, sequence_len: int, truncate: bool,
                 on_bad_rows: str, trained_roles: list[str], eval_sequence_len: int | None = None):
        self.encoder = encoder
        self.trained_segments = {int(WEIGHT_KEY_SEGMENT[r]) for r in trained_roles}
        self.path = path
        self.sequence_len = sequence_len
        # Tokens a row keeps past segmentation: one more than any length Axolotl's filters accept.
        self.keep_tokens = max(sequence_len, eval_sequence_len or 0) + 1
        self.truncate = truncate
        self.on_bad_rows = on_bad_rows

    # -- one batch of rows -------------------------------------------------------------
    def encode_batch(self, batch: dict[str, list]) -> dict[str, list]:
        if raw_rows.ROW_TEXT in batch:  # a local file's rows as written: decode each on its own
            rows = [raw_rows.parse_row(t, e) for t, e in zip(batch[raw_rows.ROW_TEXT], batch[raw_rows.READ_ERROR])]
        else:
            n = len(next(iter(batch.values())))
            rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
        readable = [r for r in rows if not isinstance(r, RowError)]
        encoded = iter(self.encoder.encode_rows(readable))
        out = {k: [] for k in ("input_ids", "attention_mask", "labels", "segment_ids", ERROR_COLUMN, STRADDLED_COLUMN,
                                         SCHEMA_COLUMN)}
        for row in rows:
            ex = row if isinstance(row, RowError) else next(encoded)
            error = ""
            if isinstance(ex, RowError):
                error = str(ex)
            else:
                if self.truncate and len(ex.input_ids) > self.sequence_len:
                    ex = ex.truncate(self.sequence_len)
                if not any(s in OUTPUT_SEGMENTS for s in ex.segment_ids):
                    error = str(RowError(
                        self._output_field(row),
                        f"no output token left (sequence_len={self.sequence_len}, {len(ex.input_ids)} tokens; "
                        "or every assistant turn is marked not trained); nothing to learn from this row",
                    ))
            if not error and len(ex.input_ids) > self.keep_tokens:
                # Still too long for Axolotl's filter (which drops and counts it), but the dataset pass
                # no longer holds a row's every token: memory per row is bounded by sequence_len.
                ex = ex.truncate(self.keep_tokens)
            ids, segs, straddled = ([], [], 0) if error else (ex.input_ids, ex.segment_ids, ex.straddled)
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(self._labels(ids, segs))
            out["segment_ids"].append(segs)
            out[ERROR_COLUMN].append(error)
            out[STRADDLED_COLUMN].append(straddled)
            out[SCHEMA_COLUMN].append(0 if error else ex.meta.get("unweighted_schema_chars", 0))
        return out

    def _output_field(self, row) -> str:
        f = self.encoder.fields
        return {"messages": f.messages, "alpaca": f.output, "prompt_completion": f.completion}[detect_format(row, f)]

    def _labels(self, ids, segs):
        # Labels mirror what carries loss in this mode, for Axolotl's own tools (--debug, packing
        # filters). The loss itself is computed from input_ids and segment_ids.
        trained = self.trained_segments
        return [t if s in trained else -100 for t, s in zip(ids, segs)]

    # -- the whole dataset -------------------------------------------------------------
    def wrap_dataset(self, dataset, process_count: int | None = None, keep_in_memory: bool | None = False, **kwargs):
        from datasets import Dataset

        if not isinstance(dataset, Dataset):
            raise TypeError(
                "type: instruction_modelling needs a map-style dataset (streaming datasets are not supported yet)"
            )
        self.path = raw_rows.source_of(dataset) or self.path  # name the file, not its saved rows
        encoded = dataset.map(
            self.encode_batch,
            batched=True,
            batch_size=256,
            num_proc=process_count if process_count and len(dataset) >= 2 * process_count else None,
            remove_columns=dataset.column_names,
            keep_in_memory=bool(keep_in_memory),
            desc="Instruction modelling: segmenting",
        )
        errors = encoded[ERROR_COLUMN]
        bad = [(self._where(dataset, i), e) for i, e in enumerate(errors) if e]
        straddled = sum(encoded[STRADDLED_COLUMN])
        REPORT.add(self.path, len(dataset), bad, straddled, sum(encoded[SCHEMA_COLUMN]))
        if bad and (self.on_bad_rows == "error" or len(bad) == len(dataset)):
            first_where, first_e = bad[0]
            if len(bad) == len(dataset) and self.on_bad_rows == "skip":
                more = f" (all {len(bad)} rows of {self.path} are bad: nothing is left to train on)"
            else:
                more = f" ({len(bad) - 1} more bad rows; im_on_bad_rows: skip drops and counts them)" if len(bad) > 1 else ""
            raise BadRowsError(f"{first_where}: {first_e}{more}")
        if bad:
            keep = [i for i, e in enumerate(errors) if not e]
            encoded = encoded.select(keep)
            for w, e in bad[:5]:
                LOG.warning(f"skipped {w}: {e}")
            LOG.warning(f"skipped {len(bad)} of {len(dataset)} rows of {self.path} (im_on_bad_rows: skip)")
        return encoded.remove_columns([ERROR_COLUMN, STRADDLED_COLUMN, SCHEMA_COLUMN])


    def _where(self, dataset, index: int) -> str:
        return raw_rows.where(dataset, index) or describe_row(self.path, index)


class PreprocessReport:
    """Counts of what the dataset pass skipped, reported once at the end of the process."""

    def __init__(self):
        self.entries: list[tuple[str | None, int, list[tuple[str, str]], int, int]] = []  # bad: (where, why)
        self._registered = False

    def add(self, path, total, bad, straddled, unweighted_schema_chars=0):
        self.entries.append((path, total, bad, straddled, unweighted_schema_chars))
        if not self._registered:
            import atexit

            atexit.register(self.log)
            self._registered = True

    def summary(self) -> str:
        lines = ["instruction_modelling preprocessing report:"]
        for path, total, bad, straddled, schema_chars in self.entries:
            lines.append(
                f"  {path}: {total} rows, {total - len(bad)} kept, {len(bad)} skipped, "
                f"{straddled} tokens straddled a template/content boundary (no loss)"
                + (f", {schema_chars} characters of tool names/descriptions that the chat template rewrites or "
                   "leaves out (no loss)" if schema_chars else "")
            )
            for w, e in bad[:3]:
                lines.append(f"    {w}: {e}")
        return "\n".join(lines)

    def log(self):
        """Log the report once (at the end of preprocessing, or before the model loads in training)."""
        if not self.entries:
            return
        skipped = any(entry[2] for entry in self.entries)
        try:
            (LOG.warning if skipped else LOG.info)(self.summary())
        except ValueError:  # stream already closed at interpreter exit
            pass
        self.entries = []


REPORT = PreprocessReport()


def load(tokenizer, cfg, ds_cfg: dict | None = None, processor=None):
    """Axolotl's strategy entry point for ``type: instruction_modelling``."""
    ds_cfg = dict(ds_cfg or {})
    args = IMArgs.from_cfg(cfg)
    check_dataset_options(ds_cfg, args.trained_roles())
    fields = row_fields_from_dataset_config(ds_cfg)

    render = None
    try:
        from axolotl.utils.chat_templates import get_chat_template_from_config

        template = get_chat_template_from_config(cfg=cfg, ds_cfg=ds_cfg, tokenizer=tokenizer)
        render = ChatRenderer(tokenizer, template, dict(cfg.get("chat_template_kwargs") or {}),
                              name=template_name_of(cfg, ds_cfg))
    except ValueError as exc:  # no template: fine for Alpaca / prompt-completion rows
        LOG.info(f"no chat template for {ds_cfg.get('path')}: {exc}")

    end_tokens = tuple(cfg.get("eot_tokens") or ())
    if render is not None:
        missing = unconfigured_end_markers(render.chat_template, tokenizer, end_tokens)
        if missing:
            LOG.warning(f"the chat template ends turns with {', '.join(missing)}, which is neither the tokenizer's "
                        f"EOS ({tokenizer.eos_token}) nor in eot_tokens, so the model is not trained to stop (as in "
                        f"Axolotl's chat_template); set eot_tokens: {list(end_tokens) + missing[:1]} to train it")
    encoder = RowEncoder(
        tokenizer=tokenizer,
        render=render,
        fields=fields,
        end_tokens=end_tokens,
        train_on_eos=train_on_eos_of(ds_cfg),
        drop_system_message=bool(ds_cfg.get("drop_system_message")),
    )
    strategy = InstructionModellingStrategy(
        encoder,
        path=ds_cfg.get("path"),
        sequence_len=int(cfg.get("sequence_len") or 2048),
        eval_sequence_len=int(cfg.get("eval_sequence_len") or 0) or None,
        truncate=(cfg.get("excess_length_strategy") or "drop").lower() == "truncate",
        on_bad_rows=args.im_on_bad_rows,
        trained_roles=args.trained_roles(),
    )
    return strategy



_axolotl_truncate_long_seq = None


def truncate_long_seq_with_segments(sample, sequence_len=2048):
    """Axolotl's ``truncate_long_seq`` (``excess_length_strategy: truncate``, ``eval_sequence_len``) also
    cutting ``segment_ids``, which it does not know about, to the same length."""
    if "segment_ids" in sample:
        sample["segment_ids"] = [seg[:sequence_len] for seg in sample["segment_ids"]]
    return _axolotl_truncate_long_seq(sample, sequence_len=sequence_len)


def keep_segments_aligned_on_truncation():
    """Route Axolotl's truncation of long sequences through ``truncate_long_seq_with_segments``
    (it looks the function up by name at call time); called from the plugin's ``register``."""
    global _axolotl_truncate_long_seq
    from axolotl.utils.data import utils

    if utils.truncate_long_seq is not truncate_long_seq_with_segments:
        _axolotl_truncate_long_seq = utils.truncate_long_seq
        utils.truncate_long_seq = truncate_long_seq_with_segments
