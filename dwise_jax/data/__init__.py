"""The data layer: the Sensorium 2023 on-disk dataset, a simulated dataset in its layout, folds."""
