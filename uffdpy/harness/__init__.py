"""What uffdpy is measured and tried with, apart from what it is.

The library (the kernel layer, the formats, the stream and the engines)
imports nothing from here; the command line and the tests do.

    vm           snapshots, loads and dumps made by a real QEMU (``VmConfig``, ``QemuVM``)
    linuxguest   a real Linux guest snapshot that answers requests on a serial port
    processcore  Linux process cores holding a known buffer (gdb's gcore, the kernel)
    synthetic    synthetic mapped-ram snapshots for ``-machine none`` (``make_synthetic``)
    workload     access workloads over loaded memory, and their latencies
    bench        eager vs lazy vs QEMU's own load; bench_ws: working sets;
                 bench_resume: QEMU's own load vs ``uffdpy resume`` of a real guest;
                 bench_answer: one page request's service, against the least Python and C
    plot         a resume over time, drawn (the ``plot`` extra)
"""
