"""Literate PyTorch for deep learning on strong gravitational lensing images (ML4SCI DeepLense tasks)

Modules:

- `deeplense_nb.data.files`: Read one DeepLense `.npy` image with every check, record what was skipped, write toy datasets in the real layouts, and plot images.
- `deeplense_nb.data.folders`: Recognise the DeepLense folder layouts and read a dataset folder as a checked, indexable torch dataset.
- `deeplense_nb.data.loaders`: Split, subset and balance a dataset and load its batches on CPU or GPU: `get_dataloaders` is the one call training makes.
- `deeplense_nb.data.store`: Pack a dataset folder into one memory-mapped store, read it back (memmap, RAM or GPU), and open folders and stores alike.
- `deeplense_nb.data.transforms`: Scale and normalise images, and augment batches on their own device: the D4 symmetries, mild resampling transforms, MixUp and CutMix.
- `deeplense_nb.diffusion`: Denoising diffusion models for DeepLense Task IV: a UNet, Gaussian diffusion with DDPM/DDIM sampling and classifier-free guidance, and an evaluation suite (FID with a lensing feature extractor, pixel statistics, power spectra, memorisation).
- `deeplense_nb.evaluation`: Predictions (soft ensembles, D4 test-time augmentation), the evaluation report (metrics, plots, report.md), `evaluate` on checkpoints and data, run comparison and the `deeplense evaluate` command.
- `deeplense_nb.metrics`: Classification metrics from class probabilities: ROC-AUC, accuracy, TPR at a fixed FPR, decision thresholds, stratified-bootstrap AUC intervals, calibration and the confusion matrix, all in one strict-JSON dict.
- `deeplense_nb.pinn`: Physics-informed classifiers for Task V: a differentiable lens-equation layer, a Lensiformer-style two-stream model and a two-head model with a lens-equation physics loss, trained as objectives, and a fair comparison against the same backbone without physics.
- `deeplense_nb.plots`: Figures of a classifier's predictions: ROC and precision-recall curves, confusion matrices, score histograms, reliability diagrams, a gallery of mistakes, the training history and AUC against training time."""

__version__ = "0.1.0"
