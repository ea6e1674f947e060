"""The benchmark's yardstick: the notebook's SFT stage is timed after each pipeline run, in turn, and
the pipeline's time is reported as the ratio of the two medians."""
import math

from toy_rlhf import benchmark


def test_each_run_is_followed_by_the_notebook_and_the_ratio_is_of_the_medians(monkeypatch):
    calls = []
    pipeline_seconds, notebook_seconds = iter([40.0, 50.0, 45.0]), iter([100.0, 90.0, 200.0])

    def run_once(folder, extra_args):
        calls.append('pipeline')
        settings = {'stages': {'sft': {'iters': 2, 'batch_size': 3}, 'reward': {'iters': 1, 'batch_size': 1}}}
        return ({'whole process': {'seconds': next(pipeline_seconds)}},
                {'settings': settings, 'sft': {'language_kl': 0.0}, 'reward': {},
                 'policies': {'beta=1': {'kl_to_reference_by_position': [1.25, 0.5]}}})

    def notebook_once(iters):
        calls.append(('notebook', iters))
        return next(notebook_seconds)

    monkeypatch.setattr(benchmark, 'run_once', run_once)
    monkeypatch.setattr(benchmark, 'notebook_once', notebook_once)
    result = benchmark.benchmark(3, notebook_iters=7)
    assert calls == ['pipeline', ('notebook', 7)] * 3
    assert result['notebook_sft_seconds'] == 100.0
    assert result['ratio_to_notebook'] == 45.0 / 100.0
    report = benchmark.format_report(result)  # every metric of a run, a list among them (the KL by position)
    assert "0.45x of it" in report and 'beta=1: kl_to_reference_by_position' in report and '1.2500, 0.5000' in report
    assert "notebook" not in str(result['median_seconds'])


def test_the_notebook_stage_runs_in_a_process_of_its_own_and_is_scaled_to_its_5000_iterations(monkeypatch):
    seconds = benchmark.notebook_once(2)  # two iterations: a real Trainer, timed and scaled by 2,500
    assert math.isfinite(seconds) and seconds > 0
    monkeypatch.setattr(benchmark.subprocess, 'run', lambda *args, **kwargs: type('Done', (), {'stdout': '0.5\n'}))
    assert benchmark.notebook_once(1000) == 0.5 * 5
