"""Literate PyTorch for deep learning on strong gravitational lensing images (ML4SCI DeepLense tasks)

Modules:

- `deeplense_nb.data.device`: Device-resident data: a whole dataset held as one compact tensor on the training device, batches drawn by index there, and batched D4 / affine augmentation that never leaves the device.
- `deeplense_nb.data.files`: Read one DeepLense `.npy` image with every check, record what was skipped, write toy datasets in the real layouts, and plot images.
- `deeplense_nb.data.folders`: Recognise the DeepLense folder layouts and read a dataset folder as a checked, indexable torch dataset.
- `deeplense_nb.data.loaders`: Split, subset and balance a dataset and load its batches on CPU or GPU: `get_dataloaders` is the one call training makes.
- `deeplense_nb.data.store`: Pack a dataset folder into one memory-mapped store, read it back (memmap, RAM or GPU), and open folders and stores alike.
- `deeplense_nb.data.transforms`: Scale and normalise images, and augment batches on their own device: the D4 symmetries, mild resampling transforms, MixUp and CutMix.
- `deeplense_nb.diffusion.evaluate`: Physics-minded checks of generated lensing images: pixel statistics, radially averaged power spectra, a nearest-neighbour memorisation check, and `evaluate_samples`, which runs them all with FID.
- `deeplense_nb.diffusion.frechet`: Fréchet inception distance (FID) for generated lensing images, with Inception-v3 features or a lensing feature extractor trained here.
- `deeplense_nb.diffusion.gaussian`: Gaussian diffusion around the UNet: noise schedules, the training objective (eps, x0 or v, optional SSIM term, label dropout), ancestral DDPM and DDIM sampling with classifier-free guidance.
- `deeplense_nb.diffusion.samples`: Generated images on disk: writing and reading the Task IV `Samples/sample{i}.npy` layout, so generated sets are read like the real one, and PNG contact sheets for looking at many samples at once.
- `deeplense_nb.diffusion.train`: The training recipe of the diffusion models: data loaders for images in [0, 1] and `train_diffusion`, which runs the package's `Learner` with AdamW, warm-up + cosine learning rate, gradient clipping, autocast and an EMA of the weights.
- `deeplense_nb.diffusion.unet`: The denoising UNet of the diffusion models: sinusoidal time embedding, GroupNorm residual blocks with scale-shift conditioning, self-attention at low resolution, optional class conditioning with a null class.
- `deeplense_nb.evaluation`: Predictions (soft ensembles, D4 test-time augmentation), the evaluation report (metrics, plots, report.md), `evaluate` on checkpoints and data, run comparison and the `deeplense evaluate` command.
- `deeplense_nb.metrics`: Classification metrics from class probabilities: ROC-AUC, accuracy, TPR at a fixed FPR, decision thresholds, stratified-bootstrap AUC intervals, calibration and the confusion matrix, all in one strict-JSON dict.
- `deeplense_nb.pinn`: Physics-informed classifiers for Task V: a differentiable lens-equation layer, a Lensiformer-style two-stream model and a two-head model with a lens-equation physics loss, trained as objectives, and a fair comparison against the same backbone without physics.
- `deeplense_nb.plots`: Figures of a classifier's predictions: ROC and precision-recall curves, confusion matrices, score histograms, reliability diagrams, a gallery of mistakes, the training history and AUC against training time."""

__version__ = "0.1.0"
