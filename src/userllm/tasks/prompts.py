"""Prompt templates: data, in one place, per task; shared by User-LLM and the text-prompt (TP) baseline.

In User-LLM the prompt holds only the instruction (and, for reviews, the target item's title and rating):
the history enters through the embeddings. In TP the same instruction follows the history written out
as text, one line per event, oldest first. Both are wrapped in the backbone's chat template when it has
one; the answer (title, genre or review) follows, ended by the tokenizer's end-of-sequence token.

Example::

    text = render(tokenizer, instruction("next_item", words), history_lines=None)   # User-LLM prompt
"""

from __future__ import annotations

TEMPLATES: dict[str, str] = {
    "next_item": "Which {item} will this user choose next? Answer with its title only.",
    "favorite_genre": "Which {category} appears most often in this user's recent history? Answer with the "
    "{category} only.",
    "review": 'This user rated "{title}" {rating} out of 5. Write the review they wrote about it.',
}
HISTORY_HEADER = "The user's history, oldest first ({item} title; rating; {category}s):"
CANDIDATES_HEADER = "The {item}s this user is most likely to choose next, most likely first:"
PLAIN_ANSWER = "\nAnswer: "  # after the instruction when the tokenizer has no chat template


def domain_words(source: str) -> dict[str, str]:
    """How the prompts name an item and a category for a dataset source."""
    if source.startswith("movielens"):
        return {"item": "movie", "category": "genre"}
    return {"item": "item", "category": "category"}


def rating_text(value: float | str) -> str:
    """``4.0`` -> ``4``, ``4.5`` -> ``4.5``; unknown ratings stay as given."""
    try:
        v = float(value)
    except ValueError:
        return str(value)
    return f"{v:g}"


def history_line(title: str, rating: float | str, categories: list[str]) -> str:
    """One event of the TP history: ``title; rating; category, category``."""
    return f"{title}; {rating_text(rating)}; {', '.join(categories) or 'unknown'}"


def instruction(task: str, words: dict[str, str], **fields: str) -> str:
    return TEMPLATES[task].format(**words, **fields)


def render(
    tokenizer, text: str, history_lines: list[str] | None, words: dict[str, str], candidates: list[str] | None = None
) -> str:
    """The full prompt text: ``text`` after the TP history (when given), in the chat template if any."""
    return render_chat(tokenizer, [{"role": "user", "content": text}], history_lines, words, candidates)


def render_chat(
    tokenizer,
    messages: list[dict[str, str]],
    history_lines: list[str] | None,
    words: dict[str, str],
    candidates: list[str] | None = None,
) -> str:
    """A conversation (``[{"role", "content"}, ...]``, as the Chat Completions API sends it) as prompt text:
    the TP history (when given), then the ``candidates`` (titles the stage-1 encoder ranks highest, when
    given), in front of the first user message, in the chat template if any (else the messages' contents,
    one per line, and ``Answer:``)."""
    messages = [dict(m) for m in messages]
    if history_lines is not None:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            messages.append(first := {"role": "user", "content": ""})
        listed = [CANDIDATES_HEADER.format(**words), *candidates, ""] if candidates else []
        first["content"] = "\n".join([HISTORY_HEADER.format(**words), *history_lines, "", *listed, first["content"]])
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + PLAIN_ANSWER


def render_chat_split(
    tokenizer,
    messages: list[dict[str, str]],
    history_lines: list[str] | None,
    words: dict[str, str],
    candidates: list[str] | None = None,
) -> tuple[str, str]:
    """:func:`render_chat`'s text cut where the first user message's own content starts: (the prefix a
    server can cache per user, the rest). ``prefix + rest`` is :func:`render_chat`'s text."""
    mark = "\x00userllm-question\x00"
    marked = [dict(m) for m in messages]
    first = next((m for m in marked if m["role"] == "user"), None)
    if first is None:
        return "", render_chat(tokenizer, messages, history_lines, words, candidates)
    first["content"] = mark + first["content"]
    text = render_chat(tokenizer, marked, history_lines, words, candidates)
    prefix, rest = text.split(mark, 1)
    return prefix, rest
