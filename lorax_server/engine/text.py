"""The text of generated tokens, one token at a time, with one decode per token.

A decoder's `step(token)` returns the text that the token adds to the request's text: what a decode of
the whole sequence adds, or "" while the sequence ends inside an unfinished character (a multi-byte
UTF-8 character split over byte tokens; its text comes with the token that completes it).

Two methods, the first that fits: tokenizers' `DecodeStream` (its Rust step, about 1 us a token, seen
with tokenizers 0.23), and a window of recent ids whose text is cached, so that a step decodes the window
once. Both start from a few prompt tokens of context, as upstream does: a decode of the new tokens alone
can differ from their text inside the sequence (sentencepiece's decoder strips the leading space of a
decode, and a character's bytes can start in the prompt).
"""

from typing import Callable, List, Optional, Sequence

try:
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # the window method needs neither
    Tokenizer = DecodeStream = None

PROMPT_CONTEXT = 5  # prompt tokens decoded before the first new token (upstream's prefix offset)
CHARACTER_TAIL = 3  # a UTF-8 character's bytes after its first: how far a context may move back to start on one
CONTEXT_TOKENS = PROMPT_CONTEXT + CHARACTER_TAIL  # the prompt tokens a decoder may read
WINDOW = 16  # the most ids the window method decodes, give or take a character; then its context moves on
PARTIAL = "\ufffd"  # what a decode shows for the bytes of an unfinished (or broken) character


def incremental_decoder(tokenizer, prompt: Sequence[int]):
    """A decoder for the tokens that follow `prompt` (its last CONTEXT_TOKENS are enough), with the
    tokenizer's own decoding, special tokens kept. DecodeStream needs the Rust backend, and transformers'
    decode may tidy spaces after it (clean_up_tokenization_spaces)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    context = character_context(decode, prompt)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tidies = getattr(tokenizer, "clean_up_tokenization_spaces", False)
    # A context that ends inside a character makes DecodeStream return the context's text too (0.23).
    if DecodeStream is None or not isinstance(backend, Tokenizer) or tidies or decode(context).endswith(PARTIAL):
        return WindowDecoder(decode, context)
    try:
        return StreamDecoder(backend, decode, context)
    except TypeError:  # a DecodeStream that takes no context ids (tokenizers before 0.22)
        return WindowDecoder(decode, context)


def character_context(decode: Callable[[List[int]], str], prompt: Sequence[int]) -> List[int]:
    """The prompt's last PROMPT_CONTEXT tokens, moved back while they start inside a character. Byte
    fallback decodes a run of byte tokens that is not whole UTF-8 as one replacement character per byte,
    so a context starting inside a character would garble the new tokens of that run too."""
    start = max(len(prompt) - PROMPT_CONTEXT, 0)
    for _ in range(CHARACTER_TAIL):
        if start == 0 or not decode(list(prompt[start:])).startswith(PARTIAL):
            break
        start -= 1
    return list(prompt[start:])


class StreamDecoder:
    """tokenizers' DecodeStream: the incremental decode runs in Rust, one call per token; its own window
    starts where a previous step's text ended, on a character. It refuses a sequence whose earlier text
    changes ("Invalid prefix": byte-fallback tokens that stop forming UTF-8); from there on the request's
    text comes from the window method, which slices such text as upstream does."""

    def __init__(self, backend, decode: Callable[[List[int]], str], context: List[int]):
        self.backend, self.decode = backend, decode
        self.stream = DecodeStream(ids=context, skip_special_tokens=False)
        self.read = context  # the ids whose text is out, from a character's start (the context at first)
        self.pending: List[int] = []  # ids since then
        self.window: Optional[WindowDecoder] = None

    def step(self, token: int) -> str:
        if self.window is not None:
            return self.window.step(token)
        self.pending.append(token)
        try:
            text = self.stream.step(self.backend, token)
        except Exception:  # whatever the Rust side raises, the window method can still slice the text
            self.window = WindowDecoder(self.decode, self.read)
            return "".join(self.window.step(t) for t in self.pending)
        if text:
            self.read, self.pending = self.pending, []
        return text or ""


class WindowDecoder:
    """Decodes `ids` (context + pending tokens, starting on a character) once per step; `text` is the
    cached text of the ids read so far, so a step's new text is what follows it. `ends` are the
    positions where a step's text ended: characters start there, and so may the next context."""

    def __init__(self, decode: Callable[[List[int]], str], context: Sequence[int]):
        self.decode = decode
        self.ids = list(context)
        self.text = decode(self.ids)
        self.ends: List[int] = []

    def step(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if len(text) <= len(self.text) or text.endswith(PARTIAL):
            return ""
        new, self.text = text[len(self.text):], text
        self.ends.append(len(self.ids))
        if len(self.ids) >= WINDOW:
            self.move_on()
        return new

    def move_on(self) -> None:
        """Starts the window at the latest end that leaves PROMPT_CONTEXT ids of context (one decode)."""
        start = max((e for e in self.ends if e <= len(self.ids) - PROMPT_CONTEXT), default=0)
        if start:
            self.ids = self.ids[start:]
            self.text = self.decode(self.ids)
            self.ends = [e - start for e in self.ends if e > start]


def final_text(tokenizer, prompt_last: int, generated: Sequence[int]) -> str:
    """The generated tokens' text as upstream decodes it once a request ends (special tokens skipped):
    after the prompt's last token, so that a leading space the tokenizer attaches to a word survives
    (decoding the new tokens alone would drop it)."""
    before = tokenizer.decode([prompt_last], skip_special_tokens=True)
    return tokenizer.decode([prompt_last, *generated], skip_special_tokens=True)[len(before):]
