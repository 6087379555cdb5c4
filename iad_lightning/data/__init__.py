"""Data: the record contract, dataset indexes per format, transforms and the datamodule."""
