"""Extra peak memory of one call, as every benchmark here measures it.

Run the measuring process with ``MEMORY_ENV`` (glibc: blocks over 64 KiB mmapped, freed memory returned
at once) so that the high-water mark is the peak of live memory, reproducible to 0.1 MB; with glibc's
defaults the same code measured 808 MB in one run and 1632 MB in the next. Then: VmRSS before, the
high-water mark reset through ``/proc/self/clear_refs``, the call, VmHWM minus that VmRSS.
"""

MEMORY_ENV = {'MALLOC_MMAP_THRESHOLD_': '65536', 'MALLOC_TRIM_THRESHOLD_': '0'}


def status_kb(field):
    """``field`` (e.g. 'VmRSS', 'VmHWM') of /proc/self/status, in kB."""
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f'no {field} in /proc/self/status')


def reset_peak():
    """Set VmHWM to the current VmRSS (writing 5 to clear_refs resets the high-water mark)."""
    with open('/proc/self/clear_refs', 'w') as refs:
        refs.write('5')


def extra_peak_mb(run):
    """MB above the resident memory at the start that ``run()`` reaches at its peak."""
    before = status_kb('VmRSS')
    reset_peak()
    run()
    return (status_kb('VmHWM') - before) / 1024
