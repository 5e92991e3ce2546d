set terminal pngcairo size 900,600
set output 'bench-results/scale/strong.png'
set logscale xy 2
set offsets graph 0.03, graph 0.03, 0, 0
set key top left
set grid
set xlabel 'ranks'
set ylabel 'tokens/s (all ranks)'
set format y '%.0s%c'
set title 'bench scale (strong): h100-nvlink-ib virtual clock vs this machine wall clock'
$emulated << EOD
2 5363013.141860
4 9325425.269389
8 15112241.961879
16 11985519.745673
32 8609494.661959
64 5664564.800848
EOD
$real << EOD
2 2333.714518
EOD
plot $emulated using 1:2 with linespoints title 'emulated h100-nvlink-ib', $real using 1:2 with points pt 7 ps 1.5 title 'real (this machine)'
