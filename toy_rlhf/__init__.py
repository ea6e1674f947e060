"""toy-rlhf: SFT, a reward model and PPO with a KL penalty on a digit language known exactly."""
import os
import time


def cores_busy_elsewhere(seconds=0.1):
    """How many cores other processes kept busy over a short look (this one sleeps meanwhile), from
    the machine's CPU counters in /proc/stat; None where there are none to read (not Linux)."""
    def busy_and_total():
        with open('/proc/stat') as counters:
            ticks = [int(value) for value in counters.readline().split()[1:]]
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # all but idle and iowait
    try:
        busy, total = busy_and_total()
        time.sleep(seconds)
        busy_after, total_after = busy_and_total()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (busy_after - busy) / max(1, total_after - total)


def choose_openmp_waiting():
    """How torch's OpenMP threads wait for each other, chosen by how busy the machine is at start.

    A thread that finishes its share of a parallel loop waits for the others; spinning catches the
    next loop sooner, sleeping leaves the core to whoever else wants it. Measured side by side on a
    2-core machine (whole SFT commands, README): spinning briefly (GOMP_SPINCOUNT=3000) is the
    fastest on an idle machine, where sleeping at once (OMP_WAIT_POLICY=PASSIVE) is 1.3x slower;
    beside one busy process every spinning setting fights it for a core (1.6x to 4x slower) and
    sleeping at once is within a few per cent of the best. So: spin briefly when no other process is
    busy, sleep when one is (or when the machine cannot say). OpenMP reads these once, when torch
    loads it, so this runs before anything in toy_rlhf imports torch; a setting of the user's wins.
    """
    if 'OMP_WAIT_POLICY' in os.environ or 'GOMP_SPINCOUNT' in os.environ:
        return
    busy = cores_busy_elsewhere()
    if busy is None or busy >= 0.5:
        os.environ['OMP_WAIT_POLICY'] = 'PASSIVE'
    else:
        os.environ['GOMP_SPINCOUNT'] = '3000'


choose_openmp_waiting()
