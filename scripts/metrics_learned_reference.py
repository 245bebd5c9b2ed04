"""Golden data for candiff's learned metrics (tests/fixtures/metrics/), from the reference packages.

- CLIP: a tiny random `transformers.CLIPModel` (the ViT-L/14 architecture at toy width) with its
  processor; image and text embeddings, CLIP score and image-image cosine for fixed images.
- LPIPS: `lpips.LPIPS(net="alex")` with its published linear heads and a seeded random AlexNet
  (the ImageNet backbone is a download), weights rounded to bf16 and stored so; distances for fixed
  image pairs.

Run: python scripts/metrics_learned_reference.py tests/fixtures/metrics
(needs torch, torchvision, transformers, tokenizers, lpips, pillow, safetensors)
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

out = sys.argv[1]
os.makedirs(f"{out}/clip_tiny", exist_ok=True)
torch.manual_seed(0)
rng = np.random.default_rng(0)


def smooth_image(h, w):
    """A random but smooth RGB image (u8): noise blurred, so resizing is exercised on structure."""
    x = rng.normal(size=(h // 4 + 2, w // 4 + 2, 3)).astype(np.float32)
    img = Image.fromarray(((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8))
    return np.asarray(img.resize((w, h), Image.BILINEAR)).copy()


# --- CLIP ---------------------------------------------------------------------------------
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

cfg = CLIPConfig(
    text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16, bos_token_id=998,
                     eos_token_id=2, pad_token_id=999, hidden_act="quick_gelu"),
    vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8, hidden_act="quick_gelu"),
    projection_dim=24,
)
model = CLIPModel(cfg).eval()
model.save_pretrained(f"{out}/clip_tiny", safe_serialization=True)
proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
proc.save_pretrained(f"{out}/clip_tiny")

import shutil
from tokenizers import Tokenizer

# The tiny FLUX.1 CLIP tokenizer (its <|endoftext|> is the highest id, as in CLIP: argmax pooling).
shutil.copy("assets/flux1-tiny/tokenizer/tokenizer.json", f"{out}/clip_tiny/tokenizer.json")
tokenizer = Tokenizer.from_file(f"{out}/clip_tiny/tokenizer.json")
prompts = ["a red cat on a boat", "a blue dog", ""]
ids = [tokenizer.encode(p).ids for p in prompts]
images = [smooth_image(48, 40), smooth_image(40, 56), smooth_image(32, 32)]

# transformers >= 5 returns an output whose `pooler_output` is the projected embedding.
proj = lambda o: o if isinstance(o, torch.Tensor) else o.pooler_output


def pil_pixels(im):
    """CLIP's preprocessing with PIL's bicubic resize (OpenAI's CLIP and transformers < 5; transformers
    5 resizes with torchvision, which differs by up to one 8-bit level)."""
    h, w = im.shape[:2]
    short = proc.size["shortest_edge"]
    nw, nh = (short, short * h // w) if w <= h else (short * w // h, short)
    r = np.asarray(Image.fromarray(im).resize((nw, nh), Image.BICUBIC)).astype(np.float32) / 255.0
    ch, cw = proc.crop_size["height"], proc.crop_size["width"]
    top, left = (nh - ch) // 2, (nw - cw) // 2
    r = (r[top:top + ch, left:left + cw] - np.array(proc.image_mean)) / np.array(proc.image_std)
    return torch.from_numpy(r.transpose(2, 0, 1).astype(np.float32))


with torch.no_grad():
    pix = proc(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    pix_pil = torch.stack([pil_pixels(i) for i in images])
    img_emb_pil = proj(model.get_image_features(pixel_values=pix_pil))
    img_emb = proj(model.get_image_features(pixel_values=pix))
    txt_emb = torch.cat([proj(model.get_text_features(input_ids=torch.tensor([i]))) for i in ids])
ie = img_emb / img_emb.norm(dim=-1, keepdim=True)
te = txt_emb / txt_emb.norm(dim=-1, keepdim=True)
clip_score = (100 * (ie * te).sum(-1)).clamp(min=0)  # torchmetrics' CLIPScore per pair
image_cos = ie @ ie.T
tensors = {f"image_{k}": torch.from_numpy(im) for k, im in enumerate(images)}
iep = img_emb_pil / img_emb_pil.norm(dim=-1, keepdim=True)
tensors.update({
    "pixel_values_pil": pix_pil.float(),
    "image_embeds_pil": img_emb_pil.float(),
    "clip_score_pil": (100 * (iep * te).sum(-1)).clamp(min=0).float(),
    "pixel_values": pix.float(),
    "image_embeds": img_emb.float(),
    "text_embeds": txt_emb.float(),
    "clip_score": clip_score.float(),
    "image_cosine": image_cos.float(),
})
tensors.update({f"ids_{k}": torch.tensor(i, dtype=torch.int64) for k, i in enumerate(ids)})
json.dump(prompts, open(f"{out}/clip_prompts.json", "w"))
save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/clip.safetensors")

# --- LPIPS --------------------------------------------------------------------------------
import lpips

torch.manual_seed(1)
net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
# bf16 halves the file; the reference runs in f32 on the same rounded values.
state = {k: v.to(torch.bfloat16).clone().contiguous() for k, v in net.state_dict().items() if not k.startswith("lins.")}
net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
save_file(state, f"{out}/lpips_alex_random.safetensors")
a = smooth_image(64, 64)
b = np.clip(a.astype(np.int16) + rng.integers(-20, 21, size=a.shape), 0, 255).astype(np.uint8)
c = smooth_image(64, 64)
pairs = [(a, b), (a, c), (a, a)]
to_t = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # [-1, 1]
with torch.no_grad():
    d = torch.stack([net(to_t(x), to_t(y)).flatten()[0] for x, y in pairs])
save_file({"a": torch.from_numpy(a), "b": torch.from_numpy(b), "c": torch.from_numpy(c), "distance": d.float()},
          f"{out}/lpips.safetensors")
json.dump({"clip_score": clip_score.tolist(), "lpips": d.tolist()}, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps({"clip_score": clip_score.tolist(), "lpips": d.tolist()}))
