set terminal pngcairo size 900,600
set output 'bench-results/spec/heldout50_4ranks.png'
set datafile separator ','
set grid
set key top right
set xlabel 'gamma'
set ylabel 'acceptance (proposals accepted)'
set title 'bench spec: base verifying draft'
plot 'bench-results/spec/heldout50_4ranks.csv' every ::1 using 3:(strcol(1) eq 'exact' ? $7 : 1/0) with points pt 7 ps 1.5 title 'exact', '' every ::1 using 3:(strcol(1) eq 'easyspec' && strcol(4) eq 'every' ? $7 : 1/0) with points pt 5 title 'easyspec, calibrated', '' every ::1 using 3:(strcol(1) eq 'easyspec' && strcol(4) eq 'never' ? $7 : 1/0) with points pt 4 title 'easyspec, never calibrated'
