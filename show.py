"""Watch speculation happen: each generated token coloured by the level that produced it.

speculative_decode returns, in stats.origin, the level each new token came from: 0 for the target's own
tokens (the correction after a rejection, the bonus after a fully accepted round, or a plain step), i
for a token that draft level i proposed and every level above it accepted. In a terminal the text is
printed in colours with a legend; elsewhere (a pipe, a file) as plain text.
"""

# ANSI colours: the target's own tokens in bold red, then one colour per draft level.
_RESET = "\033[0m"
_COLOURS = ("\033[1;31m", "\033[32m", "\033[36m", "\033[35m", "\033[33m", "\033[34m")


class Painter:
    def __init__(self, level_names: list[str], colour: bool = True):
        self.names, self.colour = level_names, colour

    def _style(self, level: int) -> str:
        return _COLOURS[min(level, len(_COLOURS) - 1)]

    def paint(self, tokenizer, ids: list[int], origin: list[int], stop_ids=()) -> str:
        """The text of `ids`, each token in the colour of origin[t]. A stop token is not text."""
        while ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        pieces = token_pieces(tokenizer, ids)
        if not self.colour:
            return "".join(pieces)
        return "".join(f"{self._style(o)}{p}{_RESET}" if p else "" for p, o in zip(pieces, origin))

    def legend(self) -> str:
        parts = []
        for i, name in enumerate(self.names):
            what = (
                f"level 0 {name} (its own correction, bonus or plain step)" if i == 0 else f"level {i} {name}"
            )
            parts.append(f"{self._style(i)}{what}{_RESET}" if self.colour else what)
        return (
            "tokens by who produced them: "
            + ", ".join(parts)
            + ("" if self.colour else " (no colours: not a terminal)")
        )


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds. A token that ends inside a multi-byte character adds nothing; the token
    that completes it carries the whole character."""
    pieces, text = [], ""
    for t in range(len(ids)):
        new = tokenizer.decode(ids[: t + 1])
        if new.endswith("\ufffd"):
            pieces.append("")
            continue
        pieces.append(new[len(text) :])
        text = new
    return pieces
