"""Progress in logs: `train.metrics.LineProgress` writes a line per ~10% of a stage, not a redraw per step."""

from train.metrics import LineProgress


def test_line_progress_writes_one_line_per_tenth_and_the_last_step():
    lines = []
    bar = LineProgress(total=95, initial=0, name="stage1", say=lines.append, seconds=1e9, gap=0.0)
    for i in range(95):
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
        bar.update(1)
    bar.close()
    assert len(lines) == 10 and all("\r" not in line for line in lines)
    assert lines[0].startswith("stage1: step 10/95 (11%)") and lines[-1].startswith("stage1: step 95/95 (100%)")
    assert lines[-1].endswith("loss 0.011")


def test_line_progress_skips_lines_too_close_together_and_resumes_mid_stage():
    lines = []
    bar = LineProgress(total=100, initial=40, name="s", say=lines.append, seconds=1e9, gap=1e9)
    for _ in range(60):
        bar.update(1)
    assert len(lines) == 1 and lines[0].startswith("s: step 100/100")  # only the end: every 10% was too soon
