"""A run's log as users read it: the run's own lines, without torchrun's.

When a run is cancelled, torchrun's agent gets SIGTERM and prints a ~45-line traceback of its own; when a rank
fails, torchrun prints a ChildFailedError traceback and a summary table after the rank's own traceback. Neither
says anything that the run's status and the rank's traceback do not, and they push the rank's traceback out of
the tail a user sees. `clfbench logs`, the TUI's log tab and the log tail a failed run keeps read the log through
`LauncherNoise`; the file keeps every line (`clfbench logs --raw`). No torch here: the TUI imports this.
"""
from __future__ import annotations

import re

# torchrun's own log lines (glog format): "W1201 00:12:49.167000 29306 site-packages/torch/distributed/elastic/..."
ELASTIC_LOG_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S*torch/distributed/(elastic|run)")
TRACEBACK = "Traceback (most recent call last):"
CHAIN_MARKERS = ("During handling of the above exception", "The above exception was the direct cause")
# The lines of torchrun's failure summary after "ChildFailedError:": rules, headings and "  key : value" rows.
SUMMARY_LINE = re.compile(r"^(=+|-+|\S+ FAILED|Failures:|Root Cause.*|\[\d+\]:|\s+.*)$")
LEFT_OUT = "(torchrun's own traceback left out here; `clfbench logs --raw` shows the whole log)"


def _is_exception_line(line: str) -> bool:
    """The last line of a traceback: unindented text that is not a chain marker (`SomeError: message`)."""
    return bool(line) and not line[0].isspace() and not line.startswith(TRACEBACK) and \
        not line.startswith(CHAIN_MARKERS)


class LauncherNoise:
    """A filter fed the log as it grows (`feed`), in chunks that may end mid-line; `finish` at the end.

    A traceback is held back until its exception line says whose it is: torchrun's (`torch.distributed.elastic.`)
    is dropped with what follows it (chained tracebacks, its summary table) and one line says so; any other is
    passed on whole. torchrun's glog lines are dropped."""

    def __init__(self) -> None:
        self.partial = ""  # the end of the last chunk, after its last newline
        self.held: list[str] = []  # a traceback not yet known to be torchrun's
        self.dropping = False  # inside torchrun's traceback or summary

    def feed(self, text: str) -> str:
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        return "".join(line + "\n" for source in lines for line in self._line(source))

    def finish(self) -> str:
        rest = self.feed("\n") if self.partial else ""
        held, self.held = self.held, []
        return rest + "".join(line + "\n" for line in held)

    def _line(self, line: str) -> list[str]:
        if self.held:
            self.held.append(line)
            if not _is_exception_line(line):
                return []
            block, self.held = self.held, []
            if line.startswith("torch.distributed.elastic."):
                noted, self.dropping = self.dropping, True  # a chained one of torchrun's: no second note
                return [] if noted else [LEFT_OUT]
            self.dropping = False
            return block
        if self.dropping:
            if not line.strip() or line.startswith(CHAIN_MARKERS) or SUMMARY_LINE.match(line):
                return []
            if line.startswith(TRACEBACK):
                self.held = [line]
                return []
            self.dropping = False
        if ELASTIC_LOG_LINE.match(line):
            return []
        if line.startswith(TRACEBACK):
            self.held = [line]
            return []
        return [line]


def readable(text: str) -> str:
    """The whole of `text` without torchrun's noise."""
    noise = LauncherNoise()
    return noise.feed(text) + noise.finish()
