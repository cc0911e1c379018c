"""The served model's entry point, as MLflow's models-from-code runs it when a registered
generator loads (`orchestrator/models.py` logs this file as the model): the model is built from
genforge's code, shipped beside it, not unpickled, as a checkpoint's state is read with
`weights_only` (nothing genforge loads runs code it was handed)."""

from mlflow.models import set_model

from workers.served import GeneratorModel

set_model(GeneratorModel())
