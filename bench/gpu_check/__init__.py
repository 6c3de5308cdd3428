"""Is this node's feed correct, and how fast? ``python3 -m bench.gpu_check --budget 420 --out DIR``.

One command for a new GPU node (and for the project's rare minutes on one): it installs what the machine
lacks from wheels brought along (``make gpu-wheels``), then runs its checks in order of importance, each in
a process of its own under its own timeout, inside an overall budget; a check it cannot reach in time is
recorded as skipped, never silently dropped. ``DIR/report.md`` and ``DIR/report.json`` are rewritten after
every check (passed / failed / skipped, figures, the log's path), and every check's output is kept whole in
``DIR/logs/``. The checks (``steps.py``):

1. versions: GPU, driver, torch, CUDA, cuDNN, NCCL, Python, numpy, OpenCV, lmdb;
2. data: the benchmark corpus and its raw and jpeg splits, and a learnable drawn split, on every core;
3. race: the host-to-GPU hand-off under stress, checked batch by batch against host checksums, with
   negative controls that break the hand-off on purpose and must show mismatches (``race.py``);
4. loader: loader -> GPU images/s against a synthetic device batch, host synchronisations counted;
5. train: ``train.py`` for 3 epochs (compiled, bf16, channels-last): the loss falls, val top-1 and
   TensorBoard events written; 6. evaluate: ``evaluate.py`` centre crop against that val top-1, ten crops,
   and an ensemble of one checkpoint twice; 7. ddp: ``torchrun --nproc_per_node 1`` with NCCL;
8. train_step: ``bench.train_step`` at batch 256 (goal: >= 0.95 of the synthetic rate at >= 25,000
   images/s); 9. kill9: a killed trainer's workers and GPU memory gone; 10. ``bench.model``;
11. ``bench.evaluate``.

Without CUDA the same checks run on the CPU at small sizes (``make test`` runs them), and the parts that
need streams (the stressed hand-off and its controls) are recorded as skipped.
"""
