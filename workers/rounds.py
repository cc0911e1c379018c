"""Progressive distillation's rounds (Salimans & Ho 2022), as the diffusion-type workers run
them: the student starts as the teacher's EMA weights and, per round of `train.steps` steps,
learns to take two of the round's teacher's sampling steps in one, halving the steps from
`distill.teacher_steps` to `distill.student_steps`; at the end of a round its EMA weights are
the next round's teacher and student. The running round's teacher is saved with every
checkpoint, so a resumed round goes on against it. A class-conditional teacher is guided at
`distill.guidance` in the first round; every student has that guidance built in."""

from __future__ import annotations

import copy
from typing import Any

from workers.conditional import ConditionalWorker
from workers.config import DEFAULT_GUIDANCE, ConditionalModel, distill_rounds


class RoundsWorker(ConditionalWorker):
    def begin_rounds(self, teacher_model: dict[str, Any], start_steps: int) -> None:
        """Called with the teacher restored as this worker's model: the rounds from the
        teacher's `start_steps` steps, the teacher kept, the student made from it."""
        cfg = self.job["distill"]
        self.start_steps = start_steps
        self.rounds = distill_rounds(start_steps, cfg["student_steps"])
        self.steps_per_round = self.job["train"]["steps"]
        self.total_steps = self.rounds * self.steps_per_round
        # a distilled teacher has its guidance built in already: it is applied at 1
        baked = teacher_model.get("distilled_guidance")
        self.teacher_guidance = 1.0 if baked is not None else cfg.get("guidance") or DEFAULT_GUIDANCE
        self.student_guidance = ConditionalModel.guided_student(teacher_model, cfg)
        original = copy.deepcopy(self.sampling_module("net")).eval().requires_grad_(False)
        self.teacher = {"net": original}
        self.modules["net"].load_state_dict(original.state_dict())
        self.emas = self.averaged(net=self.modules["net"])
        self.frozen["round_teacher"] = copy.deepcopy(original)
        self.frozen_meta["round_teacher"] = {"role": "the teacher of the round being trained"}
        self._round = -1
        self.log.set_tags({"genforge.distill.rounds": str(self.rounds),
                           "genforge.distill.teacher_steps": str(self.start_steps)})

    def round_guidance(self, r: int) -> float:
        """The guidance scale the teacher of round `r` samples with."""
        return self.teacher_guidance if r == 0 else 1.0

    def next_round(self, step: int) -> None:
        """At the end of a round but the last: its student (EMA weights) becomes the next
        round's teacher and student; a grid of it is logged."""
        averaged = self.sampling_module("net").state_dict()
        self.frozen["round_teacher"].load_state_dict(averaged)
        self.modules["net"].load_state_dict(averaged)
        if "net" in self.emas:
            self.emas["net"].restart(self.modules["net"])
        self._log_grid(step, self.job["train"]["sample_images"])
        self.modules["net"].train()

    def checkpoint_due(self, step: int, cfg: dict[str, Any]) -> bool:
        round_end = self.task.kind == "distill" and step % self.steps_per_round == 0
        return round_end or super().checkpoint_due(step, cfg)
