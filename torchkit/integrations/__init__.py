"""Training-stack integrations: :mod:`torchkit.integrations.lightning` (a ``DDPStrategy`` that installs the hook on
CPU and GPU and keeps per-rank feedback state next to each checkpoint) and :mod:`torchkit.integrations.accelerate`
(the hook after ``accelerator.prepare``, per-rank feedback state in ``save_state``/``load_state``).

Each module imports its framework; install them with ``pip install -e ".[integrations]"``.
"""
