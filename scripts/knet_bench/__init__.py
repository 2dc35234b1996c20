"""Speed and memory benchmarks of knet-lightning.

Sections (``--sections``, default all), one module each:

* ``knet`` (:mod:`.knet`): K-Net R50 panoptic (N=100, S=3, 80 things + 53 stuff) inference
  latency (forward + panoptic post-processing under ``torch.inference_mode``) and training
  step (forward + matching + losses + backward + AdamW step), with a per-part breakdown and
  peak memory.
* ``scaling`` (:mod:`.scaling`): params, GFLOPs, latency and train step over the number of
  proposals N and update stages S.
* ``eval`` (:mod:`.evaluation`): throughput of our PanopticQuality, MeanIoU and (when
  importable) MaskAP.
* ``data`` (:mod:`.data`): per-worker throughput of the training input pipeline (decode +
  augment) on COCO-format files written to a temporary folder.
* ``mask2former`` (:mod:`.mask2former`): the Hugging Face ``transformers`` Mask2Former R50
  (random weights, built from its config, no download) in the same run, reported as ratios
  K-Net / M2F.
* ``zoo`` (:mod:`.zoo`): the paper's large panoptic models (K-Net R50, R101-DCN, Swin-L) and the
  Hugging Face Mask2Former Swin-L side by side: params, GFLOPs, inference, train step, peak memory.

Modes (:mod:`.common`): full (default: 512x512 and 800x1216, the whole N x S grid),
``--quick`` (512x512, fewer repeats, a subset of the grid) and ``--tiny`` (ResNet-18, 64x64,
N=10, S=1, one repeat; exists for the smoke test ``tests/test_bench.py``, its numbers mean
nothing).

Every figure is the median of ``repeats`` timed runs after ``warmup`` untimed ones
(:mod:`.timing`). Breakdowns come from forward hooks on the submodules (``backbone``,
``fpn`` + ``neck``, ``kernel_head``, ``update_heads``, the criterion and its matcher) and
timers around the rest; the ``other`` column is what the parts do not cover (upsampling of
the stage outputs, loss summation), so the parts add up to the total. On CUDA every hook
synchronizes, so there the total is measured separately, without hooks.

Peak memory: on CPU the peak resident set size (``VmHWM``) of this process, reset before
each configuration through ``/proc/self/clear_refs`` (Linux >= 4.0), and its growth over
the RSS at the start of the configuration; on CUDA ``torch.cuda.max_memory_allocated``.

Output (:mod:`.report`, :mod:`.cli`): Markdown tables on stdout and a JSON file (``--out``),
rewritten after each section so that an interrupted run keeps what it measured.

    python scripts/bench.py --quick --threads 2
    python scripts/bench.py --device cuda --out bench_results/h100.json
    cd scripts && python -m knet_bench --tiny
"""

import os

# Mask2Former is built from a config with random weights; nothing may be fetched. Set before
# any submodule imports a library that reads these variables at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
