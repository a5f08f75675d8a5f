"""A user's own model, built through a ``package.module:function`` factory in tests."""

import os
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from genstress_ray.models.architectures import BetaVAE


def tiny_mlp(in_features: int = 64, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


class UserStyleGenerator(nn.Module):
    """Shaped like NVlabs' StyleGAN2/3 ``Generator`` where it matters here: ``mapping`` and ``synthesis``
    sub-modules, ``w_avg`` kept on the mapping network, ``z_dim``/``c_dim``/``num_ws``, images in [-1, 1].
    Unconditional, and its mapping returns one w per image (the adapter broadcasts it)."""

    def __init__(self, z_dim: int = 6, w_dim: int = 5, num_ws: int = 4, side: int = 8):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, 0, w_dim, num_ws
        self.mapping = _Mapping(z_dim, w_dim)
        self.synthesis = _Synthesis(w_dim, num_ws, side)


class _Mapping(nn.Module):
    def __init__(self, z_dim, w_dim):
        super().__init__()
        self.net = nn.Linear(z_dim, w_dim)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z, c):
        return self.net(z)


class _Synthesis(nn.Module):
    def __init__(self, w_dim, num_ws, side):
        super().__init__()
        self.side = side
        self.out = nn.Linear(w_dim * num_ws, side * side)

    def forward(self, ws):
        return torch.tanh(self.out(ws.flatten(1))).view(-1, 1, self.side, self.side)


def user_style_generator(**params) -> nn.Module:
    return UserStyleGenerator(**params)


def write_tiny_stable_diffusion(folder, words=("a", "photo", "of", "and", "chihuahua", "papillon", "tabby")) -> None:
    """A Stable Diffusion v1.x folder in diffusers layout with tiny random components, built from
    configs (no download): 16x16 RGB images from 4x8x8 latents, a CLIP text encoder over a vocabulary
    of whole ``words`` plus single letters, written by this function."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL, LMSDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         norm_num_groups=4, attention_head_dim=2).save_pretrained(folder / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=16).save_pretrained(folder / "vae")
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters),
              *(w + "</w>" for w in words if len(w) > 1)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    # Merges that build each whole word from its letters, left to right.
    merges, seen = ["#version: 0.2"], set()
    for w in words:
        prefix = w[0]
        for i, c in enumerate(w[1:], 1):
            piece = c + ("</w>" if i == len(w) - 1 else "")
            if (prefix, piece) not in seen:
                seen.add((prefix, piece))
                merges.append(f"{prefix} {piece}")
                vocab.setdefault(prefix + piece, len(vocab))
            prefix += piece
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=12)
    tokenizer.save_pretrained(tok_dir)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                 num_hidden_layers=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(folder / "text_encoder")
    LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        folder / "scheduler")


def write_tiny_transformers_classifier(folder, class_names, family: str = "resnet", side: int = 16) -> None:
    """A random-weight transformers image classifier (``save_pretrained`` layout) with its image-processor
    config: a two-stage ResNet (ConvNeXt-style processor: shortest edge ``side``, crop_pct 0.875) or a
    one-layer ViT (processor resizes to side x side). Built from configs, nothing downloaded."""
    from transformers import (ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification, ViTConfig,
                              ViTForImageClassification, ViTImageProcessorPil)

    torch.manual_seed(0)
    labels = {"id2label": dict(enumerate(class_names)), "label2id": {n: i for i, n in enumerate(class_names)},
              "num_labels": len(class_names)}
    if family == "resnet":
        model = ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                          depths=[1, 1], layer_type="basic", **labels))
        processor = ConvNextImageProcessorPil(size={"shortest_edge": side}, crop_pct=0.875)
    else:
        model = ViTForImageClassification(ViTConfig(image_size=side, patch_size=side // 2, num_channels=3, hidden_size=16,
                                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                                    **labels))
        processor = ViTImageProcessorPil(size={"height": side, "width": side})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def write_tiny_autoencoder_kl(folder, channels: int = 1, side: int = 16, latent_channels: int = 2) -> None:
    """A random-weight diffusers ``AutoencoderKL`` (Stable Diffusion's VAE layout, two blocks: latents of half
    the side) at ``side`` x ``side``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=latent_channels, norm_num_groups=4, sample_size=side).save_pretrained(folder)


def write_tiny_blip(folder, words=("a", "an", "the", "red", "blue", "sign", "on", "street", "photo", "of")) -> None:
    """A random-weight BLIP captioner (``BlipForConditionalGeneration`` and its processor) for 32x32
    images, with a BERT word-piece vocabulary of ``words``; built from configs, nothing downloaded."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil,
                              BlipProcessor)

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    text = {"vocab_size": len(vocab), "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 32, "bos_token_id": 2, "sep_token_id": 3,
            "pad_token_id": 0}
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "image_size": 32, "patch_size": 8}
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)


def write_tiny_controlnet(sd_folder, folder, conditioning_channels: int = 3) -> None:
    """A random-weight ControlNet for the tiny Stable Diffusion of ``write_tiny_stable_diffusion``: its
    UNet's encoder, and a conditioning embedding that halves the side as that VAE does."""
    from pathlib import Path

    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(Path(sd_folder) / "unet")
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8),
                              conditioning_channels=conditioning_channels).save_pretrained(folder)


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def write_tiny_chat_lm(folder, chat_template: str | None = CHAT_TEMPLATE) -> None:
    """A random-weight Llama chat model (``LlamaForCausalLM`` and a word-level tokenizer with a chat
    template) whose vocabulary holds JSON's punctuation and a few caption words; built from configs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[BOS]", "[SEP]", "{", "}", "[", "]", '"', ":", ",", "words", "alternatives",
             "captions", "red", "blue", "sign", "street", "a", "on", "the", "assistant", "user", "system"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        bos_token="[BOS]", eos_token="[SEP]")
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                                 pad_token_id=0, bos_token_id=2, eos_token_id=3)).save_pretrained(folder)


class GatedVAE(BetaVAE):
    """The built-in beta-VAE, whose ``decode`` inside a search stage's Ray actor holds at a gate the test
    closes (``gate``: a folder). Each actor that reaches it, mid-batch with its shard not yet written,
    says so in a file naming its node, so a test removes a node known to hold work in flight."""

    def __init__(self, gate: str = "", **params):
        super().__init__(**params)
        self.gate = Path(gate) if gate else None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            _hold_at_gate(self.gate)
        return super().decode(z)


_HELD: set[str] = set()  # gate generations this process has already held at


def _hold_at_gate(gate: Path) -> None:
    import ray

    if not ray.is_initialized():  # the driver's checks before Ray starts (asking would start it)
        return
    context = ray.get_runtime_context()
    in_batch = any(frame.name == "process_batch" for frame in traceback.extract_stack())
    if context.get_actor_id() is None or not in_batch:  # the driver's checks and actor set-up pass
        return
    try:
        generation = (gate / "closed").read_text()
    except FileNotFoundError:
        return
    if generation in _HELD:
        return
    _HELD.add(generation)
    (gate / f"busy-{generation}-{context.get_node_id()}-{os.getpid()}").write_text("")
    deadline = time.monotonic() + 300
    while not (gate / f"open-{generation}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def gated_vae(**params) -> GatedVAE:
    return GatedVAE(**params)
