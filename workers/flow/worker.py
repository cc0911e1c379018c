"""Flow matching (Lipman et al. 2023; Liu et al. 2023): a U-Net regresses the velocity x1 - x0 of
the straight path from noise to data (`workers/flow/ode.py`), sampled from the EMA weights by
Euler or Heun integration, class-conditional with classifier-free guidance as the model asks.

Distillation halves Euler steps, round by round (`HalvingDistill`): the student starts as the
teacher's EMA weights and learns to take the round's teacher's two Euler steps in one; at the end
of a round it becomes the next round's teacher. Each update costs two teacher evaluations and
one student update, about a training step's compute. Reflow (Liu et al.) would need, for every
training pair, a whole ODE solve of the teacher (tens of evaluations), and a reflowed model
still samples with several steps. A distilled checkpoint records `distilled_steps`,
`distilled_spacing` and, for a guided teacher, `distilled_guidance`; it samples with that many
Euler steps on that grid, its guidance built in.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from orchestrator.checkpoints import Checkpoint
from workers.diffusion.progressive import round_of
from workers.flow.config import (DEFAULT_STEPS, DISTILL_TEACHER_STEPS, SAMPLERS, SPACINGS,
                                 FlowModel, nfe)
from workers.flow.ode import flow_loss, halving_loss, integrate, time_grid, timed
from workers.nn.conditioning import conditioned, guided
from workers.nn.unet import UNet
from workers.rounds import RoundsWorker

UNET_FIELDS = ("channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout")


class FlowWorker(RoundsWorker):
    family = "flow"

    def build(self, model_cfg: dict[str, Any], image_shape: tuple[int, int, int]) -> None:
        net = UNet(in_channels=image_shape[0], image_size=image_shape[1],
                   num_classes=self.conditioning(model_cfg),
                   **{k: model_cfg[k] for k in UNET_FIELDS}).to(self.device)
        self.modules = {"net": net}
        self.emas = self.averaged(net=net)
        self.set_sampling(model_cfg)

    def set_sampling(self, model_cfg: dict[str, Any]) -> None:
        """How the model samples when a job does not say: a distilled one with its own steps,
        grid and guidance."""
        self.distilled_steps = model_cfg.get("distilled_steps")
        self.distilled_spacing = model_cfg.get("distilled_spacing")
        self.baked_guidance = model_cfg.get("distilled_guidance")

    def on_resume(self, ckpt: Checkpoint) -> None:
        self.set_sampling(self.model_cfg)  # a distillation's: the round it was saved in

    def configure_optimizers(self, train_cfg: dict[str, Any]) -> None:
        self.optimizers = {"net": torch.optim.Adam(self.modules["net"].parameters(),
                                                   lr=train_cfg["lr"])}

    def prepare_data(self, x: torch.Tensor, labels: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x, self.checked_labels(labels)

    def train_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.model_cfg
        loss = flow_loss(timed(self.conditioned_net(labels, gen)), batch, gen,
                         cfg["time_sampling"], cfg["logit_mean"], cfg["logit_std"])
        self.optimize(loss, "net")
        return {"loss": loss.detach()}

    # ---- sampling -----------------------------------------------------------------------
    def sampler_settings(self, sample_cfg: dict[str, Any] | None) -> dict[str, Any]:
        """Sampler, steps, spacing, network evaluations and guidance as `generate` applies them
        (None: the previews')."""
        cfg = sample_cfg or {}
        sampler = cfg.get("sampler") or SAMPLERS[0]
        steps = cfg.get("steps") or self.distilled_steps or DEFAULT_STEPS[sampler]
        settings = {"sampler": sampler, "steps": steps, "nfe": nfe(sampler, steps),
                    "spacing": cfg.get("spacing") or self.distilled_spacing or SPACINGS[0],
                    **self.guidance_settings(sample_cfg)}
        if sample_cfg is not None:
            settings["use_ema"] = cfg.get("use_ema", True)
        return settings

    def generate(self, n: int, sample_cfg: dict[str, Any] | None, gen: torch.Generator,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        s = self.sampler_settings(sample_cfg)
        return self.flow(self.sampling_module("net"), n, s["sampler"], s["steps"], s["spacing"],
                         gen, self.sample_labels(n, sample_cfg), s.get("guidance", 1.0),
                         progress)

    def flow(self, net: nn.Module, n: int, sampler: str, steps: int, spacing: str,
             gen: torch.Generator, labels: torch.Tensor | None = None, guidance: float = 1.0,
             progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Images from noise along `net`'s ODE (for a class-conditional `net`: of classes
        `labels`, with classifier-free guidance at scale `guidance`)."""
        x = torch.randn((n, *self.image_shape), generator=gen, device=self.device)
        was_training = net.training
        net.eval()
        try:
            velocity = guided(timed(net), labels, guidance, self.num_classes)
            x = integrate(velocity, x, time_grid(steps, spacing, self.device), sampler, progress)
        finally:
            net.train(was_training)
        return x.clamp(-1, 1)

    # ---- progressive halving of Euler steps --------------------------------------------
    def begin_distillation(self, teacher: Checkpoint) -> None:
        cfg, model = self.job["distill"], teacher.meta["model"]
        self.model_cfg = FlowModel.student_model(model, cfg)
        self.set_sampling(self.model_cfg)
        self.begin_rounds(model, cfg["teacher_steps"] or model.get("distilled_steps")
                          or DISTILL_TEACHER_STEPS)

    def distill_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                     gen: torch.Generator) -> dict[str, torch.Tensor]:
        r = round_of(self.step, self.steps_per_round)
        if r != self._round:  # entering a round (or resuming in one)
            self._round = r
            self.model_cfg = {**self.model_cfg,
                              "distilled_steps": self.start_steps // 2 ** (r + 1)}
            self.set_sampling(self.model_cfg)
        teacher = guided(timed(self.frozen["round_teacher"]), labels, self.round_guidance(r),
                         self.num_classes)
        grid = time_grid(2 * self.distilled_steps, self.distilled_spacing, self.device)
        loss = halving_loss(timed(conditioned(self.modules["net"], labels)), teacher, batch,
                            grid, gen)
        self.optimize(loss, "net")
        return {"loss": loss.detach(), "round": torch.tensor(r + 1.0),
                "student_steps": torch.tensor(float(self.distilled_steps))}

    def end_step(self, step: int) -> None:
        if self.task.kind == "distill" and step % self.steps_per_round == 0 \
                and step < self.total_steps:
            self.next_round(step)

    def teacher_generate(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.flow(self.teacher["net"], n, "euler", self.start_steps,
                         self.distilled_spacing, gen, self.sample_labels(n, None),
                         self.teacher_guidance)

    def distill_metrics(self) -> dict[str, float]:
        return {"teacher_sampling_steps": self.start_steps,
                "student_sampling_steps": self.distilled_steps}
