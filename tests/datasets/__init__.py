"""Tests of the offline data sets and the R serialization reader."""
