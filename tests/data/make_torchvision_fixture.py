# Produces tests/data/torchvision_transforms.npz with the ORIGINAL InternVL transforms (torchvision),
# run once in a separate environment (torch 2.14.1 + torchvision 0.29.1); the tests only read it.
import numpy as np, torchvision
import torchvision.transforms as T
from torchvision.transforms import InterpolationMode
from PIL import Image

S = 32
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
retrieval = T.Compose([T.Lambda(lambda im: im.convert("RGB") if im.mode != "RGB" else im),
                       T.Resize((S, S), interpolation=InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(mean, std)])
classification = T.Compose([T.Lambda(lambda im: im.convert("RGB") if im.mode != "RGB" else im),
                            T.Resize(S, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(S), T.ToTensor(),
                            T.Normalize(mean, std)])
rng = np.random.default_rng(42)
out = {"torchvision": np.array(torchvision.__version__)}
sizes = [(50, 40), (40, 77), (32, 32), (8, 8), (97, 33)]
for i, (w, h) in enumerate(sizes):
    if i == 3:  # an 8x8 grayscale digit-like image
        img = (rng.random((h, w)) * 255).astype(np.uint8)
    else:
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(img)
    out[f"image_{i}"] = img
    out[f"retrieval_{i}"] = retrieval(im).numpy()
    out[f"classification_{i}"] = classification(im).numpy()
np.savez_compressed("/work/main/tests/data/torchvision_transforms.npz", **out)
print({k: v.shape for k, v in out.items()})
