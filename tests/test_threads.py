"""How torch's OpenMP threads wait is chosen at start from how busy the machine is: spinning briefly
on an idle machine, sleeping at once beside a busy process (measured in the README); a setting of the
user's always wins."""
import os
import subprocess
import sys
import time

import pytest

import toy_rlhf

CHOICE = ("import os; [os.environ.pop(name, None) for name in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')]; "
          "import toy_rlhf; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")


@pytest.fixture
def environment(monkeypatch):
    for name in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT'):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize('busy, chosen', [(0.0, ('GOMP_SPINCOUNT', '3000')), (0.3, ('GOMP_SPINCOUNT', '3000')),
                                          (0.9, ('OMP_WAIT_POLICY', 'PASSIVE')),
                                          (None, ('OMP_WAIT_POLICY', 'PASSIVE'))])
def test_threads_spin_briefly_on_an_idle_machine_and_sleep_beside_a_busy_process(environment, busy, chosen):
    environment.setattr(toy_rlhf, 'cores_busy_elsewhere', lambda: busy)
    toy_rlhf.choose_openmp_waiting()
    name, value = chosen
    (other,) = {'OMP_WAIT_POLICY', 'GOMP_SPINCOUNT'} - {name}
    assert os.environ[name] == value and other not in os.environ


@pytest.mark.parametrize('name, value', [('OMP_WAIT_POLICY', 'ACTIVE'), ('GOMP_SPINCOUNT', '1')])
def test_a_setting_of_the_users_wins(environment, name, value):
    environment.setenv(name, value)
    environment.setattr(toy_rlhf, 'cores_busy_elsewhere', lambda: pytest.fail('measured though the user chose'))
    toy_rlhf.choose_openmp_waiting()
    assert os.environ[name] == value


def test_a_busy_process_is_seen_and_a_fresh_start_beside_it_sleeps_at_once():
    busy = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
    try:
        time.sleep(0.3)  # the busy loop under way
        assert toy_rlhf.cores_busy_elsewhere() >= 0.8  # a whole core, less the counters' 10 ms grain
        chosen = subprocess.run([sys.executable, '-c', CHOICE], capture_output=True, text=True, check=True)
    finally:
        busy.kill()
    assert chosen.stdout.split() == ['PASSIVE', 'None']
