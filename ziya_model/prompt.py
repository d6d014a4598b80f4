"""The Ziya-Visual conversation format, as one pure function.

Known (Ziya-LLaMA text format): one turn is `<human>:{query}\\n<bot>:`, the answer follows,
and turns are concatenated. Not seen in any public file, and so named options of
`PromptLayout` (../shared/spec/ziya-visual.md, "Checked against the release era"):

- `image_position`: where the 32 projected image embeddings go.
    "before_bos" `[image | bos prefix turns]` (default): transformers 4.29's BLIP-2 `generate`,
        which the release ran on, puts the image embeddings before the tokenized text (which
        starts with bos), and the same team's successor model (Fengshenbang-LM Lyrics) does the
        same. Two visual models against one text-only script: the stronger evidence.
    "after_prefix" `[bos prefix | image | turns]`: the Ziya-LLaMA fine-tuning script puts bos
        and `prompt_prefix` first (a text-only model; this project's layout until 2026-12).
- `history_order`: the order of past turns in the prompt.
    "oldest_first" (default): the order a conversation happened in, as the Ziya-LLaMA
        fine-tuning script concatenates turns.
    "newest_first": the public demo builds `previous_querys` from the newest turn to the oldest;
        if the released `chat()` joined them as given, the model saw this order.
- `after_answer`: what follows a past answer before the next `<human>`.
    "eos" (default): the Ziya-LLaMA fine-tuning script appends the eos id and no newline.
    "newline": a later few-shot script joins turns with `\\n`.

`python -m ziya_model.probe` scores every candidate layout with the real weights: the layout
under which the model gives its own reference answers the highest likelihood is the trained one.

The prompt is a list of segments: text, or one of the markers BOS, IMAGE, EOS, which are not
text (bos and eos are token ids, the image is 32 embeddings). How text becomes token ids is
`ziya_model.tokenization`'s job. A two-turn prompt in the default layout reads

    [IMAGE, BOS, "{prefix}<human>:{q1}\\n<bot>:{a1}", EOS, "<human>:{q2}\\n<bot>:"]

and the model continues after the final `<bot>:`.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

TURN_SEPARATOR = "\n"  # between a query and the assistant marker (and after an answer: "newline")

ImagePosition = Literal["before_bos", "after_prefix"]
HistoryOrder = Literal["oldest_first", "newest_first"]
AfterAnswer = Literal["eos", "newline"]


class Marker(enum.Enum):
    """A prompt segment that is not text."""

    BOS = "bos"
    IMAGE = "image"
    EOS = "eos"

    def __repr__(self) -> str:
        return self.name


BOS, IMAGE, EOS = Marker.BOS, Marker.IMAGE, Marker.EOS
Segment = str | Marker


@dataclass(frozen=True)
class PromptLayout:
    """The unverified layout choices, each a named option (see the module docstring)."""

    image_position: ImagePosition = "before_bos"
    history_order: HistoryOrder = "oldest_first"
    after_answer: AfterAnswer = "eos"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("image_position", ("before_bos", "after_prefix")),
            ("history_order", ("oldest_first", "newest_first")),
            ("after_answer", ("eos", "newline")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PromptLayout:
        """From a config's `prompt_layout` mapping (missing keys take the defaults)."""
        data = dict(data or {})
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ValueError(
                f"unknown prompt_layout keys {unknown}; allowed: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @property
    def name(self) -> str:
        """Short name for tables: `before_bos/oldest_first/eos`."""
        return f"{self.image_position}/{self.history_order}/{self.after_answer}"


DEFAULT_LAYOUT = PromptLayout()
# This project's layout before the fidelity work: `[bos prefix | image | turns]`, `\n` joins.
LEGACY_LAYOUT = PromptLayout("after_prefix", "oldest_first", "newline")


def candidate_layouts() -> Iterator[PromptLayout]:
    """Every combination of the options (8), default first: what the probe compares."""
    yield DEFAULT_LAYOUT
    for image, order, sep in itertools.product(
        ("before_bos", "after_prefix"), ("oldest_first", "newest_first"), ("eos", "newline")
    ):
        layout = PromptLayout(image, order, sep)
        if layout != DEFAULT_LAYOUT:
            yield layout


def build_prompt(
    query: str,
    history_queries: Sequence[str] = (),
    history_answers: Sequence[str] = (),
    *,
    human_name: str,
    assistant_name: str,
    prompt_prefix: str,
    layout: PromptLayout = DEFAULT_LAYOUT,
) -> list[Segment]:
    """The segments of one conversation row, in the order the model reads them.

    `history_queries[i]` was answered by `history_answers[i]`, oldest first (the layout decides
    the order they are written in). Text segments are never empty; adjacent text is merged.
    """
    if len(history_queries) != len(history_answers):
        raise ValueError(
            f"history needs one answer per query, got {len(history_queries)} queries "
            f"and {len(history_answers)} answers"
        )
    past = list(zip(history_queries, history_answers, strict=True))
    if layout.history_order == "newest_first":
        past.reverse()
    after = EOS if layout.after_answer == "eos" else TURN_SEPARATOR

    segments: list[Segment] = []
    if layout.image_position == "before_bos":
        segments += [IMAGE, BOS, prompt_prefix]
    else:
        segments += [BOS, prompt_prefix, IMAGE]
    for q, a in past:
        segments += [f"{human_name}:{q}{TURN_SEPARATOR}{assistant_name}:{a}", after]
    segments.append(f"{human_name}:{query}{TURN_SEPARATOR}{assistant_name}:")
    return _merge_text(segments)


def _merge_text(segments: list[Segment]) -> list[Segment]:
    """Join adjacent text segments and drop empty ones (a prompt prefix of "")."""
    merged: list[Segment] = []
    for seg in segments:
        if isinstance(seg, str):
            if not seg:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += seg
                continue
        merged.append(seg)
    return merged


def prompt_text(segments: Sequence[Segment]) -> str:
    """A readable rendering of segments (`<image>`, `<s>`, `</s>` for the markers), for logs."""
    names = {BOS: "<s>", EOS: "</s>", IMAGE: "<image>"}
    return "".join(names[s] if isinstance(s, Marker) else s for s in segments)
