"""What `examples/pretrain.py` and `examples/finetune.py` share: arguments, model and data building, and a
`Trainer` that logs `lm_loss` and `contrastive_loss` beside `loss`."""

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .configuration_visincontext import LOSS_WEIGHTS
from .data import ROW_KINDS, VisInContextCollator, format_dataset, prerender
from .modeling_visincontext import NEW_MODULES, VisInContextForConditionalGeneration
from .offline import default_model_and_processor
from .processing_visincontext import VisInContextProcessor

logger = logging.get_logger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A VisInContext folder or Hub id to continue from."}
    )
    vision_model: str | None = field(
        default=None, metadata={"help": "Vision tower (Hub id or folder) for a new model."}
    )
    language_model: str | None = field(default=None, metadata={"help": "Causal LM (Hub id or folder) for a new model."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2 (needs flash-attn)."}
    )
    cross_attention_every: int = field(
        default=4, metadata={"help": "A cross-attention block before every N-th LM layer."}
    )
    num_latents: int = field(default=64, metadata={"help": "Resampler latents per image or page."})
    freeze_language_model: bool = field(default=True, metadata={"help": "Keep the LM body frozen (the paper's setup)."})
    reading_loss_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the reading objective (each context latent spells out its page cells); 0 turns it off. "
            "Default: the model's own setting (off for a new model)."
        },
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the LM (0: no LoRA)."})
    lora_alpha: int = field(default=16)
    lora_target_modules: str = field(
        default="q_proj,v_proj", metadata={"help": "Comma-separated LM module names for LoRA."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the backbones in 4 bit (bitsandbytes); needs --lora_r."}
    )


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None, metadata={"help": "Hub id, data file (.jsonl/.json/.parquet/.csv) or folder."}
    )
    data_format: str = field(default="interleaved", metadata={"help": f"Row schema: one of {ROW_KINDS}."})
    dataset_config: str | None = field(default=None)
    split: str = field(default="train")
    streaming: bool = field(
        default=False, metadata={"help": "Stream the data set (IterableDataset), split across processes."}
    )
    image_root: str | None = field(default=None, metadata={"help": "Folder that relative image paths are read from."})
    context_fraction: float = field(default=0.5, metadata={"help": "Share of a document's text rendered as context."})
    max_images: int = field(default=4)
    max_pages: int = field(default=8, metadata={"help": "Most rendered context pages per sample."})
    max_length: int | None = field(default=None, metadata={"help": "Truncate token sequences to this length."})
    token_mask_prob: float = field(
        default=0.5, metadata={"help": "Probability of dropping image latents (token masking)."}
    )
    contrastive: bool = field(default=True, metadata={"help": "Add the text-centric contrastive loss (needs context)."})
    in_context: str = field(
        default="text",
        metadata={
            "help": "mimicit rows: the in-context triplets as earlier turns (text) or rendered into pages (rendered)."
        },
    )
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip and count malformed rows instead of stopping."})
    prerender: bool = field(
        default=False, metadata={"help": "Render all contexts ahead of time with datasets.map (not streaming)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for --prerender."})


LOSS_PARTS = tuple(LOSS_WEIGHTS)


class _CollatorEpoch(TrainerCallback):
    """Tells the collator the epoch at its start, so that token masking draws new masks each epoch."""

    def __init__(self, trainer: "VisInContextTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.trainer.data_collator, "epoch"):
            self.trainer.data_collator.epoch = int(state.epoch or 0)


class VisInContextTrainer(Trainer):
    """A `Trainer` that also logs the parts of the loss (`lm_loss`, `contrastive_loss`, and `eval_lm_loss`, ...
    after evaluation), each averaged like `loss` itself: over every micro-batch since the last log, on every process.
    So the logged `loss` is `lm_loss + contrastive_loss_weight * contrastive_loss` of the logged parts."""

    loss_parts: tuple[str, ...] = LOSS_PARTS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._part_sums = {mode: {name: [0.0, 0] for name in self.loss_parts} for mode in ("train", "eval")}
        self.add_callback(_CollatorEpoch(self))

    def record_loss_parts(self, outputs, training: bool) -> None:
        sums = self._part_sums["train" if training else "eval"]
        for name in self.loss_parts:
            value = outputs.get(name) if hasattr(outputs, "get") else None
            if value is not None:
                sums[name][0] += value.detach().float().item()
                sums[name][1] += 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self.record_loss_parts(outputs, training=model.training)
        return (loss, outputs) if return_outputs else loss

    def _averaged_parts(self, mode: str) -> dict[str, float]:
        """The parts' means over all processes (a collective: every process calls it at the same point), reset."""
        sums = self._part_sums[mode]
        totals = torch.tensor(
            [value for name in self.loss_parts for value in sums[name]], dtype=torch.float64, device=self.args.device
        )
        totals = self.accelerator.reduce(totals, reduction="sum") if self.accelerator.num_processes > 1 else totals
        for name in self.loss_parts:
            sums[name] = [0.0, 0]
        pairs = totals.view(-1, 2).tolist()
        return {name: round(total / count, 4) for name, (total, count) in zip(self.loss_parts, pairs) if count}

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self._averaged_parts("train"))
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        output.metrics.update({f"{prefix}_{name}": value for name, value in self._averaged_parts("eval").items()})
        return output

    def create_model_card(self, *args, **kwargs) -> None:
        """`push_to_hub` writes the VisInContext card (hub_cards/model_card.md) with this run's arguments."""
        from .hub import build_model_card

        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        model = model.base_model.model if hasattr(model, "peft_config") else model
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).name
        processor = self.processing_class if hasattr(self.processing_class, "renderer") else None
        card = build_model_card(
            model, processor, repo_id=repo_id, training_args=self.args, datasets=kwargs.get("dataset_tags")
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))


def quantization_config():
    """4-bit NF4 (QLoRA). The model keeps its new parts, vision tower and head unquantised by itself
    (`modules_not_to_quantize`), whatever `BitsAndBytesConfig` it is given."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def build_model_and_processor(args: ModelArguments, data_args: DataArguments):
    if args.load_in_4bit and not args.lora_r:
        raise ValueError("load_in_4bit: QLoRA trains LoRA adapters; also pass --lora_r")
    if args.model_name_or_path:
        extra = (
            {
                "quantization_config": quantization_config(),
                "device_map": {"": "cpu" if not torch.cuda.is_available() else 0},
            }
            if args.load_in_4bit
            else {}
        )
        # a local folder by its absolute path: adapters saved later record it as their base model
        source = (
            os.path.abspath(args.model_name_or_path)
            if os.path.isdir(args.model_name_or_path)
            else args.model_name_or_path
        )
        if args.reading_loss_weight is not None:
            extra["reading_loss_weight"] = args.reading_loss_weight
        model = VisInContextForConditionalGeneration.from_pretrained(
            source, attn_implementation=args.attn_implementation, **extra
        )
        processor = VisInContextProcessor.from_pretrained(source)
    elif args.vision_model and args.language_model:
        model = VisInContextForConditionalGeneration.from_backbones(
            vision_model=args.vision_model,
            language_model=args.language_model,
            cross_attention_every=args.cross_attention_every,
            num_latents=args.num_latents,
            **({} if args.reading_loss_weight is None else {"reading_loss_weight": args.reading_loss_weight}),
            freeze_language_model=args.freeze_language_model,
            attn_implementation=args.attn_implementation,
        )
        processor = VisInContextProcessor.from_backbones(args.vision_model, args.language_model)
    elif args.vision_model or args.language_model:
        raise ValueError("vision_model / language_model: pass both to build a new model, or --model_name_or_path")
    else:
        logger.warning(
            "no --model_name_or_path or --vision_model/--language_model: training the offline default, a "
            "small random model (visincontext.offline.default_model_and_processor)"
        )
        reading = {} if args.reading_loss_weight is None else {"reading_loss_weight": args.reading_loss_weight}
        model, processor = default_model_and_processor(
            num_latents=min(args.num_latents, 16), attn_implementation=args.attn_implementation, **reading
        )
    processor.max_pages = data_args.max_pages
    if args.lora_r:
        model = add_lora(model, args)
    return model, processor


def add_lora(model, args: ModelArguments):
    """LoRA on the language model's attention; the VisInContext parts train in full and are saved with the adapter."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if args.load_in_4bit:
        model.train()  # before any no-grad forward: bitsandbytes repacks 4-bit weights in eval mode on CPU
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = "|".join(name.strip() for name in args.lora_target_modules.split(",") if name.strip())
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules=rf".*language_model\.(?:layers|blocks)\.\d+\.decoder_layer\..*\.({targets})",  # (blocks: MPT)
        modules_to_save=list(NEW_MODULES),
    )
    return get_peft_model(model, config)


def load_training_data(data_args: DataArguments, processor, seed: int, model_config=None):
    """The formatted training data, its collator and the bad-row counter. `model_config` (the model's
    `VisInContextConfig`) switches on reading targets when the model trains its reading objective."""
    from datasets import load_dataset

    source, image_root = data_args.dataset, data_args.image_root
    if not source:
        raise ValueError("dataset: pass a Hub id, a data file or a folder")
    if os.path.isfile(source):
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(Path(source).suffix)
        if builder is None:
            raise ValueError(f"dataset: cannot read {source!r} (expected .jsonl, .json, .parquet or .csv)")
        dataset = load_dataset(builder, data_files=source, split=data_args.split, streaming=data_args.streaming)
        image_root = image_root or str(Path(source).parent)
    elif os.path.isdir(source):
        dataset = load_dataset(source, data_args.dataset_config, split=data_args.split, streaming=data_args.streaming)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ValueError(f"dataset: no file or folder at {source!r}")
    else:  # a Hub id
        dataset = load_dataset(source, data_args.dataset_config, split=data_args.split, streaming=data_args.streaming)
    # conversations are laid out by the processor's chat template
    chat = (
        {"processor": processor, "in_context": data_args.in_context}
        if data_args.data_format in ("chat", "mimicit")
        else {}
    )
    if data_args.streaming and data_args.prerender:
        raise ValueError("prerender: renders a whole data set ahead of time; not with --streaming (render on the fly)")
    if data_args.prerender:
        dataset = prerender(
            dataset,
            data_args.data_format,
            processor,
            num_proc=data_args.preprocessing_num_workers,
            skip_bad_rows=data_args.skip_bad_rows,
            context_fraction=data_args.context_fraction,
            max_images=data_args.max_images,
            image_root=image_root,
            **{k: v for k, v in chat.items() if k != "processor"},  # prerender hands the processor on itself
        )
    formatted, bad_rows = format_dataset(
        dataset,
        data_args.data_format,
        skip_bad_rows=data_args.skip_bad_rows,
        context_fraction=data_args.context_fraction,
        max_images=data_args.max_images,
        image_root=image_root,
        **chat,
    )
    reading = model_config is not None and model_config.reading_loss_weight > 0
    collator = VisInContextCollator(
        processor,
        token_mask_prob=data_args.token_mask_prob,
        seed=seed,
        return_context_ids=data_args.contrastive,
        max_length=data_args.max_length,
        reading_layout=(model_config.num_latents, model_config.reading_cells_per_latent) if reading else None,
    )
    return formatted, collator, bad_rows


def _save_without_pickle(trainer: Trainer, output_dir: str) -> None:
    """`Trainer.save_model` (it gathers ZeRO-3 weights), with the run's arguments as `training_args.json` instead of
    the pickled `training_args.bin` it writes: a saved model folder holds no pickle."""
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        pickled = Path(output_dir) / "training_args.bin"
        pickled.unlink(missing_ok=True)
        (Path(output_dir) / "training_args.json").write_text(trainer.args.to_json_string())


def save_trained(trainer: Trainer, processor, output_dir: str) -> None:
    """Saves a folder `AutoModelForImageTextToText.from_pretrained` loads. Runs on every process (ZeRO-3 gathers
    the partitioned weights). With LoRA the adapter and the fully trained VisInContext parts go to
    `output_dir/adapter` and the merged model to `output_dir` (adapter only on a 4-bit base)."""
    model = trainer.model
    if not hasattr(model, "peft_config"):
        _save_without_pickle(trainer, output_dir)
        if trainer.is_world_process_zero():
            processor.save_pretrained(output_dir)
        return
    adapter_dir = os.path.join(output_dir, "adapter")
    _save_without_pickle(trainer, adapter_dir)
    if not trainer.is_world_process_zero():
        return
    processor.save_pretrained(adapter_dir)
    if getattr(model.base_model.model, "is_loaded_in_4bit", False):
        logger.warning(
            "4-bit base: saved the adapter only; load it with peft.PeftModel.from_pretrained(base, adapter_dir)"
        )
        return
    model.merge_and_unload().save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def main(defaults: dict | None = None, args: list[str] | None = None) -> dict:
    """Parses `ModelArguments`, `DataArguments` and `TrainingArguments`, trains, saves; returns the metrics."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if defaults:
        parser.set_defaults(**defaults)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=args)
    training_args.remove_unused_columns = False
    if data_args.streaming:
        # every process reads its own part of the stream (accelerate shards a datasets.IterableDataset once);
        # batches are not dispatched from process 0, which cannot send batches of different shapes
        training_args.accelerator_config.dispatch_batches = False
    model, processor = build_model_and_processor(model_args, data_args)
    config = (model.base_model.model if hasattr(model, "peft_config") else model).config
    train_dataset, collator, bad_rows = load_training_data(
        data_args, processor, training_args.seed, model_config=config
    )
    trainer = VisInContextTrainer(
        model=model, args=training_args, train_dataset=train_dataset, data_collator=collator, processing_class=processor
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.is_deepspeed_enabled and trainer.is_world_process_zero():
        engine = trainer.model_wrapped
        print(
            f"DeepSpeed: {type(engine).__name__}, ZeRO stage {engine.zero_optimization_stage()}, "
            f"{training_args.world_size} processes"
        )
    if len(bad_rows):
        logger.warning(f"skipped {len(bad_rows)} bad rows: {sorted(bad_rows.skipped)}")
    save_trained(trainer, processor, training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history, beside the model
    return {**result.metrics, "skipped_rows": len(bad_rows), "log_history": trainer.state.log_history}
