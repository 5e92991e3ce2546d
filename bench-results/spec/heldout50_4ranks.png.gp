set terminal pngcairo size 900,600
set output 'bench-results/spec/heldout50_4ranks.png'
set datafile separator ','
set grid
set key bottom left
set xlabel 'gamma'
set ylabel 'acceptance (proposals accepted)'
set title 'bench spec: base verifying draft'
plot 'bench-results/spec/heldout50_4ranks.csv' every ::1 using 3:(strcol(1) eq 'exact' ? $7 : 1/0) with points pt 7 ps 2 title 'exact', '' every ::1 using 3:($2 == 2 && strcol(4) eq 'every' ? $7 : 1/0) with points ps 1.5 title 'easyspec lp 2, calibration every', '' every ::1 using 3:($2 == 2 && strcol(4) eq 'never' ? $7 : 1/0) with points ps 1.5 title 'easyspec lp 2, calibration never', '' every ::1 using 3:($2 == 4 && strcol(4) eq 'every' ? $7 : 1/0) with points ps 1.5 title 'easyspec lp 4, calibration every', '' every ::1 using 3:($2 == 4 && strcol(4) eq 'never' ? $7 : 1/0) with points ps 1.5 title 'easyspec lp 4, calibration never'
