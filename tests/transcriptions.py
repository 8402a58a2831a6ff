"""Plain float64 transcriptions of the paper's Eqs. (3)-(12) and of the released code's formula,
written one patch and one pixel at a time (no library code), and batches whose patches have known
kinds: the oracles of the cross-patch loss tests (single process and distributed)."""
import torch

FDP, BDP = 0.7, 0.3


# ----------------------------------------------------------------------------- inputs
def patch_kind(fs, fdp=FDP, bdp=BDP):
    return 1 if fs >= fdp else (0 if fs <= bdp else -1)


def make_labels(b, h, w, grid, kinds, gen):
    """Labels whose patches have the given kinds (1 FDP, 0 BDP, -1 MP); background is 0 or 2."""
    ph, pw = h // grid, w // grid
    n = ph * pw
    labels = torch.zeros(b, h, w, dtype=torch.int64)
    for i in range(b):
        for gi in range(grid):
            for gj in range(grid):
                options = [c for c in range(n + 1) if patch_kind(c / n) == int(kinds[i, gi, gj])]
                count = options[int(torch.randint(len(options), (1,), generator=gen))]
                patch = 2 * torch.randint(0, 2, (n,), generator=gen)  # background: class 0 or 2
                patch[torch.randperm(n, generator=gen)[:count]] = 1
                labels[i, gi * ph:(gi + 1) * ph, gj * pw:(gj + 1) * pw] = patch.view(ph, pw)
    return labels


def make_batch(b, d, h, w, grid, gen, kinds_s=None, kinds_t=None):
    """Random features and student / teacher labels with known patch kinds (random by default)."""
    n = (h // grid) * (w // grid)
    possible = [k for k in (-1, 0, 1) if any(patch_kind(c / n) == k for c in range(n + 1))]

    def kinds():
        return torch.tensor(possible)[torch.randint(len(possible), (b, grid, grid), generator=gen)]

    kinds_s = kinds() if kinds_s is None else kinds_s
    kinds_t = kinds() if kinds_t is None else kinds_t
    fs = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64)
    ft = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64)
    return dict(fs=fs, ft=ft, ys=make_labels(b, h, w, grid, kinds_s, gen),
                yt=make_labels(b, h, w, grid, kinds_t, gen), kinds_s=kinds_s, kinds_t=kinds_t)


# ----------------------------------------------------------------------------- transcriptions
def patch_cells(b, h, w, grid):
    ph, pw = h // grid, w // grid
    for i in range(b):
        for gi in range(grid):
            for gj in range(grid):
                yield i, [(r, c) for r in range(gi * ph, (gi + 1) * ph) for c in range(gj * pw, (gj + 1) * pw)]


def foreground_score(y, i, cells, fg=1):
    return sum(int(y[i, r, c]) == fg for r, c in cells) / len(cells)  # Eqs. (5), (6)


def sim(q, k, tau):
    return torch.exp(torch.dot(q, k) / (q.norm() * k.norm() * tau))  # Eq. (8)


def stack_bank(rows, d, dtype):
    """(features (M, D), labels (M,)) of a list of (feature, label) pairs."""
    if not rows:
        return torch.zeros(0, d, dtype=dtype), torch.zeros(0, dtype=torch.int64)
    return torch.stack([f for f, _ in rows]), torch.tensor([lab for _, lab in rows])


def sims(q, bank, tau):
    """Eq. (8) of q against every bank row."""
    return torch.exp(bank @ q / (bank.norm(dim=1) * q.norm() * tau))


def paper_loop(fs, ft, ys, yt, history, grid, tau=0.1):
    """L_contr of Eqs. (7)-(12). history: [(ft, yt)] of previous batches still in the banks."""
    b, d, h, w = fs.shape
    fdb, bdb = [], []  # (feature, pseudo label) of teacher pixels of FDPs / BDPs
    for f, y in [(ft, yt)] + history:
        for i, cells in patch_cells(*y.shape, grid):
            kind = patch_kind(foreground_score(y, i, cells))
            if kind >= 0:
                (fdb if kind == 1 else bdb).extend((f[i, :, r, c], int(y[i, r, c])) for r, c in cells)
    banks = {1: stack_bank(bdb, d, fs.dtype), 0: stack_bank(fdb, d, fs.dtype)}  # FDP -> BDB, BDP -> FDB
    total, patches = fs.sum() * 0, 0
    for i, cells in patch_cells(b, h, w, grid):
        kind = patch_kind(foreground_score(ys, i, cells))
        if kind < 0:
            continue
        bank, bank_labels = banks[kind]
        l_patch = 0
        for r, c in cells:
            q = fs[i, :, r, c]
            pos = sim(q, ft[i, :, r, c], tau)
            j = (bank_labels != int(ys[i, r, c])).to(q.dtype)           # Eq. (9)
            neg = (sims(q, bank, tau) * j).sum()
            l_patch = l_patch - torch.log(pos / (pos + neg))            # Eq. (7)
        total = total + l_patch / len(cells)                            # Eq. (10)
        patches += 1
    return total / patches if patches else total                        # Eqs. (11), (12)


def official_loop(fs, ft, ys, yt, history, grid, tau=0.1, eps=0.0):
    """The released code's loss: one bank of student and teacher pixels, anchors from student FDPs
    and BDPs, negatives where labels differ and FC_q + FC_k <= bdp + fdp. The released code adds
    eps = 1e-8 inside the log and to the denominator; the comparisons use eps = 0 (the library
    leaves those terms out: with tau = 0.1 a query whose positive probability is near 1e-8 moves
    by O(1), so no tolerance could absorb them). history: [(fs.detach(), ys), (ft, yt)] pairs."""
    b, d, h, w = fs.shape
    rows = []  # (feature, label, FC)
    for f, y in [(fs, ys), (ft, yt)] + history:
        for i, cells in patch_cells(*y.shape, grid):
            fc = foreground_score(y, i, cells)
            rows.extend((f[i, :, r, c], int(y[i, r, c]), fc) for r, c in cells)
    bank = torch.stack([r[0] for r in rows])
    bank = bank / bank.norm(dim=1, keepdim=True)
    bank_labels = torch.tensor([r[1] for r in rows])
    bank_fc = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    total, anchors = fs.sum() * 0, 0
    for i, cells in patch_cells(b, h, w, grid):
        fc = foreground_score(ys, i, cells)
        if BDP < fc < FDP:
            continue
        l_patch = 0
        for r, c in cells:
            a = fs[i, :, r, c] / fs[i, :, r, c].norm()
            pos = torch.dot(a, ft[i, :, r, c] / ft[i, :, r, c].norm()) / tau
            neg = bank @ a / tau
            keep = ((bank_labels != int(ys[i, r, c])) & (fc + bank_fc <= BDP + FDP + 1e-12)).to(neg.dtype)
            top = torch.max(torch.cat([pos.view(1), neg]))
            denominator = torch.exp(pos - top) + (torch.exp(neg - top) * keep).sum()
            l_patch = l_patch - torch.log(torch.exp(pos - top) / (denominator + eps) + eps)
        total = total + l_patch / len(cells)
        anchors += 1
    return total / anchors if anchors else total


def pixel_loop(fs, ft, ys, yt, history, random):
    """Table 2 Schemes 1 ("random": every other bank pixel is a negative) and 2 ("pixel":
    negatives are bank pixels of a different pseudo label); every student pixel is a query."""
    b, d, h, w = fs.shape
    rows, owner = [], []  # (feature, label); which query (i, r, c) a row is the positive of
    for age, (f, y) in enumerate([(ft, yt)] + history):
        for i in range(f.shape[0]):
            for r in range(h):
                for c in range(w):
                    rows.append((f[i, :, r, c], int(y[i, r, c])))
                    owner.append((i, r, c) if age == 0 else None)
    bank, bank_labels = stack_bank(rows, d, fs.dtype)
    total = fs.sum() * 0
    for i in range(b):
        for r in range(h):
            for c in range(w):
                q = fs[i, :, r, c]
                pos = sim(q, ft[i, :, r, c], 0.1)
                if random:
                    j = torch.tensor([who != (i, r, c) for who in owner], dtype=q.dtype)
                else:
                    j = (bank_labels != int(ys[i, r, c])).to(q.dtype)
                neg = (sims(q, bank, 0.1) * j).sum()
                total = total - torch.log(pos / (pos + neg))
    return total / (b * h * w)


def transcription(semantics, sampling, batch, history_batches, grid):
    fs, ft, ys, yt = batch["fs"], batch["ft"], batch["ys"], batch["yt"]
    if semantics == "official":
        hist = [pair for old in history_batches
                for pair in ((old["fs"].detach(), old["ys"]), (old["ft"], old["yt"]))]
        return official_loop(fs, ft, ys, yt, hist, grid)
    hist = [(old["ft"], old["yt"]) for old in history_batches]
    if sampling == "pixel-patch":
        return paper_loop(fs, ft, ys, yt, hist, grid)
    return pixel_loop(fs, ft, ys, yt, hist, random=sampling == "random")


TOL = {"paper": dict(rtol=1e-9, atol=1e-10), "official": dict(rtol=1e-9, atol=1e-10)}
