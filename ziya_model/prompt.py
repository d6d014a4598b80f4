"""The Ziya-Visual conversation format, as one pure function.

Known (Ziya-LLaMA text format): one turn is `<human>:{query}\\n<bot>:`, the answer follows and
ends with eos, and turns are concatenated. Inferred for the visual model (not seen in a public
file, see ../shared/spec/ziya-visual.md): `{prompt_prefix}` comes first, then the 32 projected
image embeddings once, then the text turns in chronological order.

The one choice made here: a finished turn's answer is followed by a single `\\n` before the
next `<human>:` (the answer's eos is not re-inserted into the history text, because the
released demo joins previous turns as text). So a two-turn prompt reads

    {prompt_prefix} [image] <human>:{q1}\\n<bot>:{a1}\\n<human>:{q2}\\n<bot>:

and the model continues after the final `<bot>:`. Change the format here only.
"""

from __future__ import annotations

from collections.abc import Sequence

TURN_SEPARATOR = "\n"  # between a query and the assistant marker, and after each past answer


def build_prompt(
    query: str,
    history_queries: Sequence[str] = (),
    history_answers: Sequence[str] = (),
    *,
    human_name: str,
    assistant_name: str,
    prompt_prefix: str,
) -> tuple[str, str]:
    """Return `(text_before_image, text_after_image)` for one conversation row.

    `history_queries[i]` was answered by `history_answers[i]`, oldest first. The image
    embeddings go between the two strings; the tokenizer adds bos to the first one only.
    """
    if len(history_queries) != len(history_answers):
        raise ValueError(
            f"history needs one answer per query, got {len(history_queries)} queries "
            f"and {len(history_answers)} answers"
        )
    turns = [
        f"{human_name}:{q}{TURN_SEPARATOR}{assistant_name}:{a}{TURN_SEPARATOR}"
        for q, a in zip(history_queries, history_answers, strict=True)
    ]
    turns.append(f"{human_name}:{query}{TURN_SEPARATOR}{assistant_name}:")
    return prompt_prefix, "".join(turns)
