"""BDF entry point: `python -m experiments.bdf [--config=...:PRESET] [--config.x=y] [--workdir=D]`.

With no arguments: writes the built-in synthetic SYSU-MM01-layout data into the cache
(`~/.cache/maumjax`, or $MAUMJAX_CACHE), builds it, trains a tiny ResNet with BDF (the
[V; I; V^; I^] batch, DID + MML + MDL) and evaluates it with the full SYSU-MM01 protocol,
printing Rank-1 / mAP / mINP. Presets and switches: experiments/configs/bdf.py. A run
restarted with the same --workdir resumes.
"""

from experiments import launch

if __name__ == "__main__":
  launch.main("bdf")
