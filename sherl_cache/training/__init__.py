"""Stage two: train the SHERL fusion, the late route and a head from cached hidden states."""
