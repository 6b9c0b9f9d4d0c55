// Declares hello_fast::augment_mix (the schema); kernels live in cpu/ and cuda/.
//
// One pass per output pixel: crop (top, left, h, w) of src[index[b]] (or, with shuffle (B, 2, factor), of its
// ShufflePatches: row strips in the order shuffle[b][0], column strips in the order shuffle[b][1], each strip
// size / factor pixels and the last source strip also the remainder; the taps read the source through it) resized to out_size x out_size
// (bilinear, align_corners=False, no antialias), flipped if flip[b], mixed with the partner sample
// (mixup: lam-weighted; cutmix: the box cut[b] = (top, left, bottom, right) taken from the partner),
// and written as several normalised views ((x/255 - mean)/std) in their own dtypes (codes: 0 float32,
// 1 float16, 2 bfloat16), at most kMaxViews (limits.h) of them. Returns the views; lam_eff, each sample's own-label
// weight, is computed once for every backend by the Python op (hello_fast.ops.augment_mix.effective_lam).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(hello_fast, m) {
  m.def(
      "augment_mix(Tensor src, Tensor index, Tensor crop, Tensor flip, Tensor partner, Tensor lam, Tensor cut, "
      "str mode, int out_size, float[] mean, float[] std, int[] dtypes, bool channels_last, Tensor? shuffle=None) "
      "-> Tensor[]");
}
