"""Extra peak memory of one call, as every benchmark script here measures it.

Run the measuring process with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` (large blocks
mmapped, freed blocks returned at once) so that the high-water mark is the peak of live memory:
VmRSS before, the high-water mark reset through ``/proc/self/clear_refs``, the call, VmHWM minus
that VmRSS.
"""

MEMORY_ENV = {'MALLOC_MMAP_THRESHOLD_': '65536', 'MALLOC_TRIM_THRESHOLD_': '0'}


def status_kb(field):
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def extra_peak_mb(run):
    """MB above the resident memory at the start that ``run()`` reaches at its peak."""
    before = status_kb('VmRSS')
    with open('/proc/self/clear_refs', 'w') as refs:
        refs.write('5')
    run()
    return (status_kb('VmHWM') - before) / 1024
