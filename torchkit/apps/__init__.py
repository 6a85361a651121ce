"""Applications built on the torchkit library: the command-line tools (``torchkit``, :mod:`torchkit.apps.cli`),
the demo (:mod:`~torchkit.apps.demo`), the paper reproductions (:mod:`~torchkit.apps.repro`), the kernel and
collective benchmarks (:mod:`~torchkit.apps.bench`), the shaped-network benchmark (:mod:`~torchkit.apps.netbench`,
which shells out to ``ip`` and ``tc``) and the training tasks they share (:mod:`~torchkit.apps.tasks`).

They use the library only through its public modules; the library never imports this package
(``tests/test_layering.py`` checks both directions).
"""
