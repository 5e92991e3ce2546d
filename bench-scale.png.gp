set terminal pngcairo size 900,600
set output 'bench-scale.png'
set logscale xy 2
set offsets graph 0.03, graph 0.03, 0, 0
set key top left
set grid
set xlabel 'ranks'
set ylabel 'tokens/s (all ranks)'
set format y '%.0s%c'
set title 'bench scale (weak): h100-nvlink-ib virtual clock vs this machine wall clock'
$emulated << EOD
1 4762779.591439
2 4918707.710411
EOD
$real << EOD
1 6483.927348
2 3922.568562
EOD
plot $emulated using 1:2 with linespoints title 'emulated h100-nvlink-ib', $real using 1:2 with points pt 7 ps 1.5 title 'real (this machine)'
