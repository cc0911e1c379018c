"""Workers: one package per model family (`workers/<family>/`, listed in workers/registry.py),
each running its jobs through the harness of workers/base.py; networks and samplers more than
one family uses live in workers/nn/ and workers/diffusion/."""
