"""Model-ready arrays from raw cases, SegVol's way: ``segevo pseudomask`` and ``segevo preprocess``.

Per case, as SegVol's training build and inference do it (reference/segvol.md section 2):

1. read the image as float32 (MONAI's ``LoadImage``), keep one channel of a multi-channel image
   (``preprocess.channel``, default the first);
2. ``ForegroundNormalization``: clip to the [0.05, 99.95] percentiles of the voxels above the volume mean, z-score
   with those voxels' mean and std. M3D-Seg images were written already normalised this way by SegVol's
   authors, so they skip this step (doing it twice is not the identity);
3. ``DimTranspose`` (``np.swapaxes(-1, -3)``: raw (X, Y, Z) -> (D, H, W)), ``MinMaxNormalization`` to [0, 1];
4. ``CropForeground`` of the voxels > 0 (margin 0): the box is kept, so a prediction maps back exactly
   (:func:`~segevo.data.preprocess.geometry.to_raw_grid`);
5. labels become class indices (``classes[i - 1]``), cropped like the image, never resized; the zoom-out copies
   at the model ROI use trilinear for the image and nearest neighbour (at voxel centres, torch's
   ``nearest-exact``) for labels and pseudo-masks, a documented deviation from SegVol's ``area`` mode.

Pseudo-masks (SegVol's ``pseudo_mask_process.py``) run on the same normalised, *uncropped* image in raw array
order: resized to ``pseudomask.grid`` with MONAI's default area mode (as SegVol's ``Resized``), 3D
Felzenszwalb-Huttenlocher, the ground truth painted on
top, then the clean-up; ``preprocess`` resizes the result back to the raw array by nearest neighbour and
transposes and crops it like the image.

Every output is written atomically (a case's prep folder is built aside and renamed into place), a case is
skipped when its fingerprint (raw checksum, file stats, the parameters it depends on and the code that makes
it) matches the one stored with its outputs, and a bad case raises :class:`~segevo.data.cases.CaseError`
naming it (or is left out and reported with ``data.skip_bad_cases``).

The parts, after nnU-Net's ``default_preprocessor``:

- :mod:`~segevo.data.preprocess.transforms`: the pure array transforms above;
- :mod:`~segevo.data.preprocess.geometry`: raw grid <-> prep grid (the crop box and axis order);
- :mod:`~segevo.data.preprocess.case`: one case's arrays in memory (read through :mod:`segevo.data.readers`);
- :mod:`~segevo.data.preprocess.jobs`: one case's files, written atomically, or reused when up to date;
- :mod:`~segevo.data.preprocess.fingerprint`: what "up to date" means;
- :mod:`~segevo.data.preprocess.pool`: the process pool and the bad-case policy;
- :mod:`~segevo.data.preprocess.stages`: the two stage runners.
"""
