"""Plain float64 numpy references of the modules, written from the papers' formulas (each
module's docstring states its own)."""

import numpy as np


def softmax_masked(scores, mask):
  """scores [..., L], mask [..., L] -> weights, all-masked rows zero."""
  out = np.zeros_like(scores, dtype=np.float64)
  for idx in np.ndindex(scores.shape[:-1]):
    m = mask[idx]
    if m.any():
      s = scores[idx][m].astype(np.float64)
      e = np.exp(s - s.max())
      out[idx][m] = e / e.sum()
  return out


def early_fusion(q_kernel, k_kernel, v_kernel, tables, target, behaviors, buckets, mask, heads):
  """Literal early fusion: x_tj = [e_j ; E_k[b_tj^k] ...], per-head softmax attention."""
  b, l, _ = behaviors.shape
  kmods = buckets.shape[-1]
  z = [tables[k][buckets[..., k]] for k in range(kmods)]
  x = np.concatenate([behaviors, *z], axis=-1).astype(np.float64)
  q = (target.astype(np.float64) @ q_kernel).reshape(b, heads, -1)
  dh = q.shape[-1]
  keys = (x @ k_kernel).reshape(b, l, heads, dh)
  values = (x @ v_kernel).reshape(b, l, heads, dh)
  out = np.zeros((b, heads, dh))
  for i in range(b):
    for h in range(heads):
      scores = keys[i, :, h] @ q[i, h] / np.sqrt(dh)
      a = softmax_masked(scores[None], mask[i][None])[0]
      out[i, h] = a @ values[i, :, h]
  return out.reshape(b, heads * dh)


def cosine(target, behaviors):
  t = target.astype(np.float64)
  bh = behaviors.astype(np.float64)
  tn = np.linalg.norm(t, axis=-1, keepdims=True)
  bn = np.linalg.norm(bh, axis=-1, keepdims=True)
  t = t / np.maximum(tn, 1e-8)
  bh = bh / np.maximum(bn, 1e-8)
  return np.einsum("bd,bld->bl", t, bh)


def bucketize(s, num_buckets):
  return np.clip(np.floor((s + 1.0) / 2.0 * num_buckets), 0, num_buckets - 1).astype(np.int64)


def simtier(s, mask, tiers, normalization):
  b, l, k = s.shape
  out = np.zeros((b, k, tiers))
  for i in range(b):
    for kk in range(k):
      for j in range(l):
        if mask[i, j]:
          out[i, kk, bucketize(s[i, j, kk], tiers)] += 1
  if normalization == "normalized":
    out = out / np.maximum(mask.sum(-1), 1)[:, None, None]
  elif normalization == "log1p":
    out = np.log1p(out)
  return out


def cross_network(x, kernels, biases, downs=()):
  """DCNv2 cross layers in float64: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, with W_l = kernels[l]
  [D, D] or, given downs, the low-rank downs[l] [D, r] @ kernels[l] [r, D] (row vectors)."""
  x0 = x = np.asarray(x, np.float64)
  for l, (kernel, bias) in enumerate(zip(kernels, biases)):
    h = x @ np.asarray(downs[l], np.float64) if len(downs) else x
    x = x0 * (h @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)) + x
  return x


def layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def transformer_layer(x, mask, p, heads):
  """Post-norm encoder layer in float64 for one sequence: x [T, D], mask bool [T]; p: dict of
  numpy arrays (q, k, v, o, f1, f2 as (kernel, bias); n1, n2 as (scale, bias))."""
  x = np.asarray(x, np.float64)
  lin = lambda y, name: y @ p[name][0] + p[name][1]
  t, d = x.shape
  c = d // heads
  out = np.zeros((t, d))
  q, k, v = lin(x, "q"), lin(x, "k"), lin(x, "v")
  for h in range(heads):
    cols = slice(h * c, (h + 1) * c)
    scores = q[:, cols] @ k[:, cols].T / np.sqrt(c)
    scores = np.where(mask[None, :], scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out[:, cols] = w @ v[:, cols]
  h1 = layer_norm(x + lin(out, "o"), *p["n1"])
  f = lin(h1, "f1")
  f = np.where(f > 0, f, 0.01 * f)  # leaky_relu, slope 0.01
  return layer_norm(h1 + lin(f, "f2"), *p["n2"])


def gru(x, mask, w_in, b_in, u, attention=None):
  """float64 GRU / AUGRU over one sequence x [L, D] (see dmf_jax.nn.recurrent.GRU):
  w_in [D, 3H], b_in [3H], u [H, 3H]; mask bool [L]; attention [L] or None."""
  x = np.asarray(x, np.float64)
  hidden = u.shape[0]
  h = np.zeros(hidden)
  out = []
  sig = lambda z: 1 / (1 + np.exp(-z))
  for t in range(len(x)):
    xs, hs = x[t] @ w_in + b_in, h @ u
    r = sig(xs[:hidden] + hs[:hidden])
    g = sig(xs[hidden:2 * hidden] + hs[hidden:2 * hidden])
    if attention is not None:
      g = g * attention[t]
    c = np.tanh(xs[2 * hidden:] + r * hs[2 * hidden:])
    if mask[t]:
      h = (1 - g) * h + g * c
    out.append(h.copy())
  return np.stack(out)
