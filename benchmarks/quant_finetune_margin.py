"""Why agreement stalls: fp32 top-1 margins on the dev images vs the int8 error of that margin.

For each bundle and target: measured agreement with fp32, sigma = std of the int8 error of the
fp32 top-1 − top-2 logit margin, and the Gaussian estimate of agreement sum(Phi(-margin/sigma));
then the agreement that estimate gives for smaller sigmas.

    python benchmarks/quant_finetune_margin.py BUNDLE [BUNDLE ...]   (ResNet-20 bundles)
"""
import sys, json
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import numpy as np, torch
from edgeres import targets

from scipy.stats import norm
from quant_finetune_sim import dev_batch
from edgeres.sources.loading import load_model
L = load_model(str(ROOT.parent / "shared" / "data" / "cifar10" / "resnet20.th")); spec = L.spec
from edgeres.model.torch_model import build_torch
m = build_torch(spec); m.load_state_dict(L.state_dict); m.eval(); torch.set_num_threads(2)
x = dev_batch(spec, 5000)
with torch.no_grad(): f = np.concatenate([m(torch.from_numpy(x[s:s+500])).numpy() for s in range(0,5000,500)])
top = np.argsort(-f, 1); i = np.arange(5000)
marg = f[i, top[:,0]] - f[i, top[:,1]]
print("fp32 margins: <0.1: %d  <0.25: %d  <0.5: %d  <1: %d" % tuple((marg < t).sum() for t in (0.1,0.25,0.5,1)))
def pred(sm): return 100*(1-norm.cdf(-marg/sm).sum()/5000)  # approx (top-2 only)
for b in sys.argv[1:]:
    man = json.loads((Path(b)/"manifest.json").read_text())
    for t in ("onnx","openvino","tflite"):
        a = next(a for a in man["artifacts"] if a["target"]==t and a["precision"]=="int8")
        r = targets.get_target(t).load_runner(Path(b)/a["file"], threads=2)
        y = np.concatenate([r(x[s:s+500]) for s in range(0,5000,500)])
        e = y - f; em = e[i, top[:,0]] - e[i, top[:,1]]
        sm = em.std(); agree = 100*(y.argmax(1)==f.argmax(1)).mean()
        print(f"{b:14s} {t:8s} measured {agree:.2f}  sigma_margin {sm:.4f}  gaussian-predicted {pred(sm):.2f}")
for sm in (0.4,0.3,0.2,0.15,0.1,0.07,0.05):
    print("sigma_margin %.2f -> predicted agreement %.2f" % (sm, pred(sm)))
