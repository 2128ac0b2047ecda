"""`runtime.progress`: a few lines per loop in batch runs (executed notebooks
keep every refresh), a widget in an interactive Jupyter kernel, the terminal's
text bar otherwise; rank 0 only."""

import re
import sys
import types

import pytest
import tqdm
import tqdm.notebook
import tqdm.std

from wsss_core import runtime

ITEMS = 1000


@pytest.fixture
def clock(monkeypatch):
    """tqdm's clock under the test's control: each item of `items(seconds)` takes that many seconds. It starts
    at the real time, so tqdm's monitor thread (disabled anyway) would never see a refresh as overdue."""
    import time

    now = [time.time()]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)

    def items(seconds):
        for i in range(ITEMS):
            now[0] += seconds
            yield i

    return items


def lines(text):
    """What a notebook keeps of the bar: every refresh (\\r) or newline is a line."""
    return [s for s in re.split(r"[\r\n]", text) if s.strip()]


def counts(text):
    return [int(m) for m in re.findall(rf"\| *(\d+)/{ITEMS} \[", text)]


def run(items, **kwargs):
    assert list(runtime.progress(items, **kwargs)) == list(range(ITEMS))


@pytest.mark.parametrize("seconds, expected", [
    (0.05, [0, ITEMS]),  # a 50 s loop: its first and final lines only (60 s between refreshes)
    (0.5, [0, 251, 502, 753, ITEMS]),  # a 500 s loop: the quarters (a 251st item and 60 s since the last line)
])
def test_batch_runs_print_a_few_lines(monkeypatch, capsys, clock, seconds, expected):
    monkeypatch.setenv("WSSS_BATCH", "1")
    monkeypatch.delenv("RANK", raising=False)
    run(clock(seconds), total=ITEMS, desc="boundary 1/3")
    out = capsys.readouterr().out
    shown = lines(out)
    assert len(shown) <= 5 and counts(out) == expected, shown
    assert shown[-1].startswith("boundary 1/3: 100%|") and f"| {ITEMS}/{ITEMS} [" in shown[-1]
    assert out.endswith("\n") and all(len(s) <= 100 for s in shown)  # ascii text, ncols 100


def test_batch_runs_without_a_length_refresh_at_most_every_minute(monkeypatch, capsys, clock):
    monkeypatch.setenv("WSSS_BATCH", "1")
    run(clock(0.5))  # a generator: no total; 500 s
    shown = lines(capsys.readouterr().out)
    assert 2 <= len(shown) <= 1 + 500 // 60 + 1 and shown[-1].split()[0] == f"{ITEMS}it", shown


def test_terminal_bar_is_unchanged(monkeypatch, capsys, clock):
    monkeypatch.delenv("WSSS_BATCH", raising=False)
    assert not runtime._in_jupyter_kernel()
    bar = runtime.progress(clock(0.05), total=ITEMS, desc="cams")
    assert type(bar) is tqdm.std.tqdm
    assert list(bar) == list(range(ITEMS))
    out = capsys.readouterr().out
    # the bar as it was: ascii text on stdout, 100 columns, a refresh every 0.5 s (of the 50 s)
    reference = tqdm.std.tqdm(clock(0.05), total=ITEMS, desc="cams", file=sys.stdout, ncols=100, ascii=True,
                              mininterval=0.5)
    assert list(reference) == list(range(ITEMS))
    assert out == capsys.readouterr().out
    assert len(lines(out)) > 50 and lines(out)[-1].startswith("cams: 100%|")


def test_only_rank_zero_shows_a_bar(monkeypatch, capsys, clock):
    monkeypatch.setenv("WSSS_BATCH", "1")
    monkeypatch.setenv("RANK", "1")
    run(clock(0.5), total=ITEMS)
    assert capsys.readouterr().out == ""
    run(clock(0.5), total=ITEMS, disable=False)  # asked for explicitly
    assert counts(capsys.readouterr().out)[-1] == ITEMS


def test_a_jupyter_kernel_gets_a_widget_and_papermill_text(monkeypatch, capsys, clock):
    import IPython

    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules.get("ipykernel") or types.ModuleType("ipykernel"))
    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace(kernel=object()))
    monkeypatch.delenv("WSSS_BATCH", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    bar = runtime.progress(range(5), desc="x")
    assert isinstance(bar, tqdm.notebook.tqdm) and list(bar) == list(range(5))
    capsys.readouterr()
    monkeypatch.setenv("WSSS_BATCH", "1")  # papermill runs the notebook in a kernel too: text, for the record
    bar = runtime.progress(clock(0.05), total=ITEMS)
    assert type(bar) is tqdm.std.tqdm and list(bar) == list(range(ITEMS))
    assert counts(capsys.readouterr().out) == [0, ITEMS]
