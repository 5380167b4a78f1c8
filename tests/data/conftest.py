"""The digits (configs/digits.py), prepared once in each test module that asks for them: their data
folder, config and source."""
import pytest

from kldino.data import datasets
from tests.data.helpers import digits_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def config(data_dir):
  return digits_config(data_dir)


@pytest.fixture(scope='module')
def source(config):
  return datasets.get_source(config.data)
