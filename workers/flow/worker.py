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

import copy
from typing import Any, Callable

import torch
from torch import nn

from orchestrator.checkpoints import Checkpoint
from workers.conditional import ConditionalWorker
from workers.config import DEFAULT_GUIDANCE
from workers.ddpm.config import distill_rounds
from workers.diffusion.progressive import round_of
from workers.flow.config import (DEFAULT_STEPS, DISTILL_TEACHER_STEPS, SAMPLERS, SPACINGS,
                                 FlowModel, nfe)
from workers.flow.ode import flow_loss, halving_loss, integrate, time_grid, timed
from workers.nn.conditioning import conditioned, guided
from workers.nn.ema import EMA
from workers.nn.unet import UNet

UNET_FIELDS = ("channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout")


class FlowWorker(ConditionalWorker):
    family = "flow"

    def build(self, model_cfg: dict[str, Any], image_shape: tuple[int, int, int]) -> None:
        net = UNet(in_channels=image_shape[0], image_size=image_shape[1],
                   num_classes=self.conditioning(model_cfg),
                   **{k: model_cfg[k] for k in UNET_FIELDS}).to(self.device)
        self.modules = {"net": net}
        self.emas = {"net": EMA(net, decay=self.job.get("train", {}).get("ema_decay", 0.999))}
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
        self.start_steps = (cfg["teacher_steps"] or model.get("distilled_steps")
                            or DISTILL_TEACHER_STEPS)
        self.rounds = distill_rounds(self.start_steps, cfg["student_steps"])
        self.steps_per_round = self.job["train"]["steps"]
        self.total_steps = self.rounds * self.steps_per_round
        # a guided teacher's scale is applied in the first round and built into every student
        # (a distilled teacher has it built in already: it is applied at 1)
        baked = model.get("distilled_guidance")
        self.teacher_guidance = 1.0 if baked is not None else cfg["guidance"] or DEFAULT_GUIDANCE
        self.model_cfg = FlowModel.student_model(model, cfg)
        self.set_sampling(self.model_cfg)
        original = copy.deepcopy(self.sampling_module("net")).eval().requires_grad_(False)
        self.teacher = {"net": original}
        self.modules["net"].load_state_dict(original.state_dict())
        self.emas = {"net": EMA(self.modules["net"], decay=self.job["train"]["ema_decay"])}
        # the running round's teacher, in every checkpoint: a resumed round keeps its teacher
        self.frozen["round_teacher"] = copy.deepcopy(original)
        self.frozen_meta["round_teacher"] = {"role": "the teacher of the round being trained"}
        self._round = -1
        self.log.set_tags({"genforge.distill.rounds": str(self.rounds),
                           "genforge.distill.teacher_steps": str(self.start_steps)})

    def distill_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                     gen: torch.Generator) -> dict[str, torch.Tensor]:
        r = round_of(self.step, self.steps_per_round)
        if r != self._round:  # entering a round (or resuming in one)
            self._round = r
            self.model_cfg = {**self.model_cfg,
                              "distilled_steps": self.start_steps // 2 ** (r + 1)}
            self.set_sampling(self.model_cfg)
        teacher = guided(timed(self.frozen["round_teacher"]), labels,
                         self.teacher_guidance if r == 0 else 1.0, self.num_classes)
        grid = time_grid(2 * self.distilled_steps, self.distilled_spacing, self.device)
        loss = halving_loss(timed(conditioned(self.modules["net"], labels)), teacher, batch,
                            grid, gen)
        self.optimize(loss, "net")
        return {"loss": loss.detach(), "round": torch.tensor(r + 1.0),
                "student_steps": torch.tensor(float(self.distilled_steps))}

    def end_step(self, step: int) -> None:
        if self.task.kind != "distill" or step % self.steps_per_round or step == self.total_steps:
            return
        # Round over: its student (EMA weights) is the next round's teacher and student.
        averaged = self.emas["net"].module.state_dict()
        self.frozen["round_teacher"].load_state_dict(averaged)
        self.modules["net"].load_state_dict(averaged)
        self.emas["net"] = EMA(self.modules["net"], decay=self.job["train"]["ema_decay"])
        self._log_grid(step, self.job["train"]["sample_images"])
        self.modules["net"].train()

    def checkpoint_due(self, step: int, cfg: dict[str, Any]) -> bool:
        round_end = self.task.kind == "distill" and step % self.steps_per_round == 0
        return round_end or super().checkpoint_due(step, cfg)

    def teacher_generate(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.flow(self.teacher["net"], n, "euler", self.start_steps,
                         self.distilled_spacing, gen, self.sample_labels(n, None),
                         self.teacher_guidance)

    def distill_metrics(self) -> dict[str, float]:
        return {"teacher_sampling_steps": self.start_steps,
                "student_sampling_steps": self.distilled_steps}
