"""Does Glom.compile_steps give the eager model's rollout and gradients on this torch?

A diagnostic run once on the device's torch 2.11 (resume/gpu_sessions/session3.log): it
compares, for the current model, the model of commit fa92091 ("old") and the current model with
_NetworkTail kept out of the compiled graph ("new-notail"), the largest difference between the
eager and the compiled model's final state and each parameter's gradient (over its largest value).
Needs the old model beside it:

    mkdir -p runs/diag && git show fa92091:glom_mnist/model.py > runs/diag/model_old.py
    python scripts/compile_grad_check.py

(Since then Glom.compile_steps refuses torch older than 2.14; this script checks what it found.)
"""
import os, shutil, sys, time, torch
sys.path[:0] = ['.']
shutil.copy('runs/diag/model_old.py', 'glom_mnist/model_old.py')
from glom_mnist import GlomConfig
import glom_mnist.model as new
import glom_mnist.model_old as old
os.remove('glom_mnist/model_old.py')  # imported: the copy is not left in the package
new.COMPILE_MIN_TORCH = (0, 0)  # let it compile: what it computes there is the question
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
print("torch", torch.__version__, flush=True)

def check(label, module, device):
    torch._dynamo.reset()
    cfg = GlomConfig.preset("seed", height=6, width=5, steps=4, dropout=0.0, noise=0.0)
    torch.manual_seed(0)
    eager = module.Glom(cfg).to(device); comp = module.Glom(cfg).to(device)
    comp.load_state_dict(eager.state_dict()); comp.compile_steps()
    images = torch.randn(3, 1, 6, 5, device=device); res = []
    t = time.time()
    for m in (eager, comp):
        torch.manual_seed(1); lv = m(images); lv[:, -1].square().mean().backward()
        res.append((lv.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (a, ga), (b, gb) = res
    print(f"{label:12s} {device}: state {(a - b).abs().max().item():.2e} grads "
          + " ".join(f"{n} {(ga[n] - gb[n]).abs().max().item():.2e}/{ga[n].abs().max().item():.1e}" for n in ga)
          + f" ({time.time() - t:.0f} s)", flush=True)

for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
    check("old", old, device)
    check("new", new, device)
    orig = new._NetworkTail.apply
    new._NetworkTail.apply = torch._dynamo.disable(orig)
    check("new-notail", new, device)
    new._NetworkTail.apply = orig
