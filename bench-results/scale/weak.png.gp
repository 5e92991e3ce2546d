set terminal pngcairo size 900,600
set output 'bench-results/scale/weak.png'
set logscale xy 2
set offsets graph 0.03, graph 0.03, 0, 0
set key top left
set grid
set xlabel 'ranks'
set ylabel 'tokens/s (all ranks)'
set format y '%.0s%c'
set title 'bench scale (weak): h100-nvlink-ib virtual clock vs this machine wall clock'
$emulated << EOD
1 5057249.104995
2 5071116.569388
4 9541635.311771
8 17298602.632103
16 20254410.312728
32 28399144.141586
64 38937284.121340
EOD
$real << EOD
1 4443.448767
2 2040.867129
EOD
plot $emulated using 1:2 with linespoints title 'emulated h100-nvlink-ib', $real using 1:2 with points pt 7 ps 1.5 title 'real (this machine)'
