"""Run a model over a test loader with progress and ETA; gather results across processes."""
import datetime
import logging
import time

import torch

from ..distributed import all_gather, get_world_size, is_main_process

logger = logging.getLogger("regionclip")


def _log_progress(done: int, total: int, start: float) -> None:
    per_image = (time.perf_counter() - start) / done
    eta = datetime.timedelta(seconds=int(per_image * (total - done)))
    logger.info("Inference %d/%d images, %.3f s/image, ETA %s", done, total, per_image, eta)


@torch.no_grad()
def inference_on_dataset(model, data_loader, evaluator, log_period_s: float = 10.0):
    """Feed every batch to ``model`` and ``evaluator.process``; return ``evaluator.evaluate()``.

    The model is put in eval mode for the run and its previous mode restored afterwards.
    Progress (count, seconds per image, ETA) is logged at most every ``log_period_s`` seconds
    and at the end; with several processes each counts its own shard, and the predictions of
    all shards are gathered and evaluated on the main process (the others return ``{}``).
    """
    total = (len(data_loader.sampler) if hasattr(data_loader, "sampler")
             else sum(len(batch) for batch in data_loader))
    logger.info("Start inference on %d images (%d processes)", total, get_world_size())
    was_training = model.training
    model.eval()
    evaluator.reset()
    start = last_log = time.perf_counter()
    done = 0
    try:
        for inputs in data_loader:
            evaluator.process(inputs, model(inputs))
            done += len(inputs)
            if time.perf_counter() - last_log > log_period_s or done == total:
                _log_progress(done, total, start)
                last_log = time.perf_counter()
    finally:
        model.train(was_training)
    return evaluate_gathered(evaluator)


def evaluate_gathered(evaluator):
    """``evaluator.evaluate()`` over the predictions of every process, on the main process.

    Shards are concatenated in rank order, which for contiguous shards is dataset order.
    """
    if get_world_size() == 1:
        return evaluator.evaluate()
    shards = all_gather(evaluator.predictions)
    if not is_main_process():
        return {}
    return evaluator.evaluate([prediction for shard in shards for prediction in shard])
