import pytest
import torch

from pipeline.models.quantize import pack_int4, quantize_rowwise, unpack_int4


@pytest.mark.parametrize("bits", [8, 4])
def test_rowwise_round_trip_error_is_within_half_a_step(bits):
    torch.manual_seed(0)
    # Rows on very different scales: a per-table scale would wipe out the small rows.
    table = torch.randn(500, 33) * torch.logspace(-3, 1, 500).unsqueeze(1)
    q = quantize_rowwise(table, bits)
    restored = q.dequantize()
    row_range = table.max(1).values - table.min(1).values
    bound = row_range / (2 * (2**bits - 1))
    error = (restored - table).abs().max(1).values
    assert (error <= bound * (1 + 1e-5) + 1e-7).all()
    # And it really uses the grid: the error is not trivially zero.
    assert error.max() > 0


def test_sizes():
    table = torch.randn(1000, 64)
    q8, q4 = quantize_rowwise(table, 8), quantize_rowwise(table, 4)
    assert q8.codes.shape == (1000, 64) and q8.codes.dtype == torch.uint8
    assert q4.codes.shape == (1000, 32)
    assert q8.bytes_per_row() == 64 + 8  # codes + fp32 scale + fp32 offset
    assert q4.bytes_per_row() == 32 + 8
    fp32_bytes = table.numel() * 4
    assert fp32_bytes / q8.nbytes > 3.5
    assert fp32_bytes / q4.nbytes > 6


def test_constant_rows_and_padding_row_are_exact():
    table = torch.randn(4, 8)
    table[0] = 0.0
    table[2] = 1.25
    restored = quantize_rowwise(table, 4).dequantize()
    assert torch.equal(restored[0], table[0]) and torch.equal(restored[2], table[2])


def test_lookup_of_some_rows_matches_full_dequantization():
    table = torch.randn(50, 10)
    q = quantize_rowwise(table, 4)
    rows = torch.tensor([[3, 0], [49, 7]])
    assert torch.equal(q.dequantize(rows), q.dequantize()[rows])


def test_int4_pack_unpack_odd_width():
    codes = torch.randint(0, 16, (7, 5), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes), 5), codes)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        quantize_rowwise(torch.randn(2, 2), 3)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rowwise(torch.randn(2), 8)
